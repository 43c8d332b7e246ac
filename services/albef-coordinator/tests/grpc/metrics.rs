//! The Prometheus endpoint.

use super::*;

/// GET /metrics, parsed: `name{labels}` -> value, checking the exposition format on the way.
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"), "{head}");
    let mut typed = BTreeSet::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "gauge" || kind == "counter", "{line}");
            typed.insert(name.to_string());
        } else if !line.starts_with("# HELP ") {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(typed.contains(name), "{name} has no TYPE line");
            samples.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
    }
    samples
}

#[tokio::test]
async fn the_prometheus_endpoint_reports_the_job_and_a_down_collector_stays_quiet() {
    let dir = JobDir::new();
    // An OTLP endpoint where nothing listens: export fails quietly, the service is unaffected.
    let settings = [
        "coordinator.metrics_listen=127.0.0.1:0".to_string(),
        "env:OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9".into(),
        "env:OTEL_METRIC_EXPORT_INTERVAL=100".into(),
    ];
    let c = dir.start(1, &settings);
    let metrics = c.metrics.clone().expect("the coordinator announces its metrics endpoint");
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let mut hb = beat("w", &j, 5);
    let terms = [("ita".into(), 1.5), ("itm".into(), 0.5), ("mlm".into(), 2.0)].into();
    hb.losses = Some(albef_proto::v1::Losses { terms, total: 4.0 });
    hb.grad_norm = 2.5;
    let skipped = [("corrupt_image".to_string(), 3)].into();
    hb.sources = [("cc3m/*.tar".to_string(), albef_proto::v1::SourceCounts { trained: 37, skipped })].into();
    hb.bad_samples = [("corrupt_image".to_string(), 3), ("empty_caption".to_string(), 1)].into();
    let example = |key: &str| SkippedSample {
        reason: "corrupt_image".into(),
        source: "s3://b/shard-1.tar".into(),
        key: key.into(),
        detail: "bad Huffman code".into(),
    };
    hb.bad_sample_examples = vec![example("000007"), example("000019")];
    w.heartbeat(hb).await.unwrap();
    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!(status.bad_samples.get("corrupt_image"), Some(&3));
    assert_eq!(status.grad_norm, 2.5);
    assert_eq!(status.sources["cc3m/*.tar"].trained, 37);
    assert_eq!(status.bad_sample_examples, vec![example("000007"), example("000019")]);
    let location = dir.checkpoint(4);
    let ck =
        ReportCheckpointRequest { generation: 1, rank: 0, step: 4, location, epoch: 0, step_in_epoch: 4, best: false };
    w.report_checkpoint(ck).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = scrape(&metrics);
    for (series, want) in [
        ("albef_job_state{state=\"running\"}", 1.0),
        ("albef_job_state{state=\"paused\"}", 0.0),
        ("albef_job_generation", 1.0),
        ("albef_workers_alive", 1.0),
        ("albef_job_step", 5.0),
        ("albef_job_images_per_second", 10.0),
        ("albef_job_loss{loss=\"itm\"}", 0.5),
        ("albef_job_loss{loss=\"total\"}", 4.0),
        ("albef_job_grad_norm", 2.5),
        ("albef_source_samples_trained_total{source=\"cc3m/*.tar\"}", 37.0),
        ("albef_source_samples_skipped_total{source=\"cc3m/*.tar\",reason=\"corrupt_image\"}", 3.0),
        ("albef_checkpoints_committed_total", 1.0),
        ("albef_checkpoint_latest_step", 4.0),
        ("albef_bad_samples_total{reason=\"corrupt_image\"}", 3.0),
        ("albef_job_restarts_total", 0.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series} in {m:?}");
    }
    assert!(m["albef_checkpoint_age_seconds"] < 60.0);
    let log = c.log();
    assert!(log.contains("exporting traces and metrics over OTLP"), "{log}");
    assert!(!log.contains("ERROR") && !log.contains("opentelemetry"), "a down collector is not logged:\n{log}");
}
