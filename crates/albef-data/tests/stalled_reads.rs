//! Reads of an object store that stop answering (tests/python/stalling_s3.py, a real HTTP server
//! on 127.0.0.1 that holds its connections open mid-body) neither hang the index nor the loader:
//! each stalled read is retried, then given up and counted, within `data.read_timeout_s`.

mod common;

use albef_data::bad::{SkipCounts, SkipReason};
use albef_data::index::DatasetIndex;
use albef_data::loader::InputLimits;
use albef_data::store::{Location, STALL_RETRIES};
use albef_data::synth::{DatasetSpec, write_dataset};
use common::{load_index, loader_options, synth_tokenizer};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The stalling endpoint over `root`, and its port.
fn serve(root: &Path) -> (Server, u16) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut child = Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("tests/python/stalling_s3.py"))
        .arg(root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the .venv's python (make setup)");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (Server(child), line.trim().parse().unwrap())
}

/// Three shards behind the endpoint: one served, one whose every read stalls (the index leaves
/// it out, counted), one indexed whole whose later read stalls (the loader's retries give up on
/// it and count its samples); every sample of the served shard is delivered, and neither the
/// index nor the loader takes longer than its reads' deadlines.
#[test]
fn stalled_object_store_reads_are_retried_then_counted_never_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let spec = DatasetSpec { seed: 3, image_res: 32, train: 48, test: 1, shards: 3 };
    write_dataset(&Location::open(dir.path().to_str().unwrap()).unwrap(), &spec, rt.handle()).unwrap();
    let names = ["served-0.tar", "stall-1.tar", "late-2.tar"];
    for (i, name) in names.iter().enumerate() {
        std::fs::rename(dir.path().join(format!("train-{i:06}.tar")), dir.path().join(name)).unwrap();
    }
    let (_server, port) = serve(dir.path());
    // Only this test runs in this binary: nothing else reads the environment meanwhile.
    for (key, value) in [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "albef".into()),
        ("AWS_SECRET_ACCESS_KEY", "stall".into()),
        ("AWS_REGION", "us-east-1".into()),
    ] {
        unsafe { std::env::set_var(key, value) };
    }
    let stall = Duration::from_secs(1);
    // Opening, then each of the retries, may wait a deadline; a margin for the rest.
    let bound = stall * (STALL_RETRIES + 1) * 2 + Duration::from_secs(10);

    let sources: Vec<String> = names.iter().map(|n| format!("s3://bucket/{n}")).collect();
    let started = Instant::now();
    let index_skips = SkipCounts::default();
    let index = DatasetIndex::build_within(&sources, rt.handle(), &index_skips, stall).unwrap();
    let took = started.elapsed();
    let indexed: Vec<&str> = index.sources.iter().map(|s| s.url.as_str()).collect();
    assert_eq!(indexed, sources.iter().map(String::as_str).collect::<Vec<_>>(), "{}", index_skips.summary());
    // The stalling shard keeps what arrived before the stall (its first 4 KiB).
    assert_eq!(index_skips.get(SkipReason::TruncatedShard), 1, "{}", index_skips.summary());
    assert_eq!(index_skips.total(), 1, "{}", index_skips.summary());
    let example = index_skips.examples().into_iter().next().unwrap();
    let retries = format!("no byte for 1 s, {} times", STALL_RETRIES + 1);
    assert!(example.key.is_empty() && example.detail.contains(&retries), "{example:?}");
    assert!(took < bound, "indexing took {took:?}");
    println!("indexed in {took:?}: {:?}", index.counts());

    let counts = index.counts();
    assert!(counts[1] > 0 && counts[1] < 16, "{counts:?}: the stalling shard's samples before the stall");
    let started = Instant::now();
    let opts = loader_options(InputLimits { read_timeout: stall, ..InputLimits::default() });
    let loaded = load_index(index, 4, (opts, synth_tokenizer()), rt.handle(), bound * 4);
    let (keys, skips) = match loaded {
        Ok(loaded) => loaded,
        Err(why) => {
            rt.shutdown_background();
            panic!("the loader hung on the stalled shard: {why}")
        }
    };
    let delivered = keys.len() as u64;
    println!("delivered {delivered} of {counts:?} in {:?}: {}", started.elapsed(), skips.summary());
    assert_eq!(
        delivered + skips.total(),
        counts.iter().sum::<u64>(),
        "each sample delivered or counted: {}",
        skips.summary()
    );
    assert!(delivered >= counts[0] + counts[1], "the served shard and the stalling shard's first samples: {delivered}");
    assert!(skips.total() > 0, "the late shard's stalled reads are counted");
    rt.shutdown_background();
}
