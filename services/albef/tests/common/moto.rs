//! moto's S3 server for the end-to-end tests that need object storage (included with `#[path]`,
//! apart from `common`, so that a test takes only this).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The secret access key the tests use: no log may show it.
pub const SECRET: &str = "albef-s3-secret-9f27c1";

/// moto's S3 server on a free port, with one bucket; killed on drop.
pub struct Moto {
    child: Child,
    endpoint: String,
}

fn python() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
}

impl Moto {
    pub fn start(bucket: &str) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(python().with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (make setup installs moto[server] into .venv)");
        // Dropped on a panic below: the server goes with it.
        let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.boto3(&format!("s3.create_bucket(Bucket='{bucket}')"));
        moto
    }

    /// What points object_store's S3 client (s3:// URLs) at this server.
    pub fn env(&self) -> [(&'static str, &str); 5] {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "albef"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// Runs Python `code` with `s3`, a boto3 client of this server (and `sys`); its stdout.
    pub fn boto3(&self, code: &str) -> String {
        let script = format!(
            "import boto3, sys\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='albef', aws_secret_access_key='{SECRET}')\n{code}",
            self.endpoint
        );
        let out = Command::new(python()).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{code}\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
