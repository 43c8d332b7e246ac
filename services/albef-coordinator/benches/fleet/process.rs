//! The coordinator under test: a real `albef-coordinator` process, and connections to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// The coordinator process and what it printed of its addresses.
pub struct Coordinator {
    child: Child,
    pub endpoint: String,
    pub metrics: String,
}

impl Coordinator {
    pub fn start(dir: &Path, workers: usize, backend: &str) -> Coordinator {
        // STEPS_PER_EPOCH at batch 4 for every rank.
        let samples = workers * 4 * crate::STEPS_PER_EPOCH as usize;
        let index = format!(r#"{{"version":1,"sources":[{{"url":"x.tar","kind":"webdataset","samples":{samples}}}]}}"#);
        std::fs::write(dir.join("albef-index.json"), index).unwrap();
        let settings = [
            "coordinator.listen=127.0.0.1:0".to_string(),
            "coordinator.metrics_listen=127.0.0.1:0".into(),
            format!("data.index={}", dir.join("albef-index.json").display()),
            format!("job.run_dir={}", dir.join("run").display()),
            format!("job.min_workers={workers}"),
            format!("job.max_workers={workers}"),
            format!("job.collective_backend={backend}"),
            "train.batch_size_train=4".into(),
        ];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef-coordinator"));
        for s in &settings {
            cmd.args(["--set", s]);
        }
        let log = std::fs::File::create(dir.join("coordinator.log")).unwrap();
        let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(log).spawn().expect("coordinator");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut endpoint, mut metrics) = (None, None);
        while endpoint.is_none() || metrics.is_none() {
            let line = lines.next().expect("the coordinator printed its addresses").unwrap();
            if let Some(a) = line.strip_prefix("listening on ") {
                endpoint = Some(format!("http://{a}"));
            } else if let Some(a) = line.strip_prefix("metrics on ") {
                metrics = Some(a.to_string());
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Coordinator { child, endpoint: endpoint.unwrap(), metrics: metrics.unwrap() }
    }

    /// (user + system CPU seconds, RSS bytes, peak RSS bytes) from /proc.
    pub fn usage(&self) -> (f64, u64, u64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb = |key: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
        };
        (ticks / 100.0, kb("VmRSS:"), kb("VmHWM:"))
    }

    /// One counter of the Prometheus endpoint.
    pub fn counter(&self, name: &str) -> f64 {
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} not in the scrape"))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(endpoint: &str) -> Channel {
    let mut backoff = Duration::from_millis(50);
    loop {
        match Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
