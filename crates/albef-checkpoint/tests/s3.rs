//! Checkpoints on a real S3-protocol server: moto's server mode, started here on 127.0.0.1.
//! Multipart uploads, verified reads, listing, leftovers and removal go through object_store's
//! S3 client exactly as they would against AWS.

use albef_checkpoint::{FileEntry, WriteOptions, check, folder, list, read_file, read_manifest, remove, write};
use albef_data::store::Location;
use bytes::Bytes;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn venv_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin").join(name)
}

/// moto_server on a free port; killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server (make setup installs moto[server] into .venv)");
        // Drain its log so that it never blocks on a full pipe.
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || BufReader::new(err).lines().for_each(drop));
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    pub fn create_bucket(&self, bucket: &str) {
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='test', aws_secret_access_key='test').create_bucket(Bucket='{bucket}')",
            self.endpoint
        );
        let status = Command::new(venv_bin("python")).args(["-c", &script]).status().unwrap();
        assert!(status.success(), "creating the bucket");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn checkpoints_round_trip_through_s3_with_multipart_uploads() {
    let moto = Moto::start();
    moto.create_bucket("ckpt");
    // This test binary holds this one test, so the process environment is its own.
    // SAFETY: set before any other thread of this process reads the environment.
    unsafe {
        for (k, v) in [
            ("AWS_ENDPOINT", moto.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let run = Location::open("s3://ckpt/jobs/run-1").unwrap();
    // 12 MiB in 5 MiB parts (S3's minimum): a three-part upload.
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let files = vec![
        ("model.safetensors".to_string(), Bytes::from(big.clone())),
        ("trainer_state.json".to_string(), Bytes::from_static(br#"{"step":20}"#)),
    ];
    let opts = WriteOptions { part_bytes: 5 << 20, concurrency: 2 };
    let manifest = rt.block_on(write(&folder(&run, 20), 20, files, opts, &mut |_: &FileEntry| {})).unwrap();
    assert_eq!(manifest.total_bytes(), (12 << 20) + 11);
    assert_eq!(rt.block_on(check(&folder(&run, 20))).unwrap(), manifest);
    let back = rt.block_on(read_manifest(&folder(&run, 20))).unwrap();
    let model = rt.block_on(read_file(&folder(&run, 20), &back, "model.safetensors")).unwrap();
    assert!(model == big, "the multipart object reads back byte for byte");

    // A save that died after its first file: listed as incomplete, never as a checkpoint.
    rt.block_on(folder(&run, 30).join("model.safetensors").write_all(Bytes::from_static(b"partial"))).unwrap();
    let listed: Vec<(u64, bool)> = rt.block_on(list(&run)).unwrap().iter().map(|l| (l.step, l.complete)).collect();
    assert_eq!(listed, [(20, true), (30, false)]);
    assert_eq!(rt.block_on(albef_checkpoint::remove_incomplete(&run, None)).unwrap(), [30]);
    rt.block_on(remove(&folder(&run, 20))).unwrap();
    assert!(rt.block_on(list(&run)).unwrap().is_empty(), "nothing left in the bucket's run prefix");
}
