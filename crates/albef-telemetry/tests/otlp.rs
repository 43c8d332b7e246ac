//! An OTLP collector in the test (a tonic server implementing the collector's trace and metrics
//! services) receives the spans and metrics of a process that set OTEL_EXPORTER_OTLP_ENDPOINT.

use albef_telemetry::metrics::{Kind, Registry};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        r: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.spans.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        r: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[test]
fn spans_and_metrics_reach_an_otlp_collector() {
    let collector = Collector::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    rt.spawn(server);
    // SAFETY: this test binary holds this one test; no other thread reads the environment yet.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_METRIC_EXPORT_INTERVAL", "200");
    }
    let telemetry = albef_telemetry::init("albef-otlp-test");
    let registry = Registry::default();
    registry.declare("albef_test_images_per_second", Kind::Gauge, "Throughput.");
    registry.declare("albef_test_bad_samples_total", Kind::Counter, "Skipped samples.");
    registry.set("albef_test_images_per_second", &[], 123.5);
    registry.set("albef_test_bad_samples_total", &[("reason", "corrupt")], 4.0);
    telemetry.export_metrics(&registry);
    {
        let step = tracing::info_span!("step", step = 7u64);
        let _s = step.enter();
        tracing::info_span!("forward").in_scope(|| std::thread::sleep(Duration::from_millis(5)));
        tracing::info_span!("backward").in_scope(|| std::thread::sleep(Duration::from_millis(5)));
    }
    let started = Instant::now();
    while collector.metrics.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(telemetry); // flushes the spans

    let spans: Vec<_> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .flat_map(|rs| {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value);
            assert_eq!(service, Some(Value::StringValue("albef-otlp-test".into())));
            rs.scope_spans.iter().flat_map(|s| s.spans.iter()).cloned().collect::<Vec<_>>()
        })
        .collect();
    let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no span {n}: {spans:?}"));
    let step = by_name("step");
    assert_eq!(by_name("forward").parent_span_id, step.span_id, "phases nest in the step");
    assert_eq!(by_name("backward").trace_id, step.trace_id);

    let points: Vec<(String, f64)> = collector
        .metrics
        .lock()
        .unwrap()
        .iter()
        .flat_map(|r| r.resource_metrics.iter())
        .flat_map(|rm| rm.scope_metrics.iter())
        .flat_map(|sm| sm.metrics.iter())
        .flat_map(|m| {
            let points = match &m.data {
                Some(Data::Gauge(g)) => g.data_points.clone(),
                Some(Data::Sum(s)) => s.data_points.clone(),
                _ => vec![],
            };
            points.into_iter().map(|p| match p.value {
                Some(number_data_point::Value::AsDouble(v)) => (m.name.clone(), v),
                other => panic!("{other:?}"),
            })
        })
        .collect();
    assert!(points.contains(&("albef_test_images_per_second".into(), 123.5)), "{points:?}");
    assert!(points.contains(&("albef_test_bad_samples_total".into(), 4.0)), "{points:?}");
}
