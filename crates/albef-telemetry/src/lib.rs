//! Telemetry of the albef binaries, set up by `init` at the start of each: logs (JSON when stderr
//! is not a terminal, readable on one; level from `RUST_LOG`), OpenTelemetry traces and metrics
//! over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or a signal-specific `OTEL_*` endpoint) is
//! set, and the metrics registry behind the Prometheus endpoints.
//!
//! - `init` returns a `Telemetry` guard to keep alive (dropping it flushes the exporters);
//!   `Telemetry::export_metrics` exports a registry's families as OpenTelemetry instruments.
//! - `metrics::Registry`: families declared up front, samples set by the program or computed at
//!   read time by a refresh hook (the coordinator derives its metrics from the job state);
//!   `metrics::spawn_prometheus` serves it as `/metrics`.
//! - `tensorboard`: TensorBoard event files (scalars by step), written best effort.
//!
//! No libtorch: the coordinator uses it too.

pub mod metrics;
pub mod tensorboard;

use metrics::{Kind, Registry};
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// Crates whose own spans and logs must not be exported (the exporter's transport would trace
/// itself) nor repeat a down collector's errors in the log.
const QUIET: [&str; 8] =
    ["opentelemetry", "opentelemetry_sdk", "opentelemetry_otlp", "tonic", "h2", "hyper", "hyper_util", "tower"];

/// Keeps the exporters alive; dropping it flushes what they hold.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    /// The exporters' gRPC connections live on this runtime.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Whether an OTLP endpoint is configured (the standard variables; OTEL_SDK_DISABLED wins).
pub fn otlp_configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]
            .iter()
            .any(|k| set(k))
}

/// Sets up logging (and OTLP when configured) for the process `service`; keep the result alive
/// until the process ends.
pub fn init(service: &str) -> Telemetry {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for quiet in QUIET {
        // The exporters' own complaints (a collector that is down) stay out of the log unless
        // RUST_LOG names them.
        if !std::env::var("RUST_LOG").unwrap_or_default().contains(quiet) {
            filter = filter.add_directive(format!("{quiet}=off").parse().expect("a valid directive"));
        }
    }
    let fmt = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
    } else {
        tracing_subscriber::fmt::layer().json().with_current_span(true).with_writer(std::io::stderr).boxed()
    };
    let mut telemetry = Telemetry { tracer: None, meter: None, runtime: None };
    let mut otel_error = None;
    let otel = if otlp_configured() {
        match telemetry.start_otlp(service) {
            Ok(tracer) => {
                let not_ours = QUIET
                    .iter()
                    .fold(Targets::new().with_default(LevelFilter::TRACE), |t, q| t.with_target(*q, LevelFilter::OFF));
                Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(not_ours))
            }
            Err(e) => {
                otel_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).init();
    match otel_error {
        Some(e) => tracing::warn!("OpenTelemetry export is off: {e:#}"),
        None if telemetry.tracer.is_some() => tracing::info!(service, "exporting traces and metrics over OTLP"),
        None => {}
    }
    telemetry
}

impl Telemetry {
    fn start_otlp(&mut self, service: &str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracer> {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("otlp").enable_all().build()?;
        // The exporters' channels are created (and spawn their connection tasks) on this runtime.
        let _guard = runtime.enter();
        let resource = Resource::builder().with_service_name(service.to_string()).build();
        let spans = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let tracer = SdkTracerProvider::builder().with_batch_exporter(spans).with_resource(resource.clone()).build();
        let exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic().build()?;
        let meter = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter).build())
            .with_resource(resource)
            .build();
        let sdk_tracer = tracer.tracer(service.to_string());
        self.tracer = Some(tracer);
        self.meter = Some(meter);
        self.runtime = Some(runtime);
        Ok(sdk_tracer)
    }

    /// Exports every family of `registry` as OpenTelemetry observable instruments (read at each
    /// export). Without an OTLP endpoint this does nothing.
    pub fn export_metrics(&self, registry: &Registry) {
        let Some(provider) = &self.meter else { return };
        let meter = provider.meter("albef");
        for (name, kind, help) in registry.families() {
            let (r, n) = (registry.clone(), name.clone());
            let observe = move |obs: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
                for (labels, value) in r.samples(&n) {
                    let attrs: Vec<KeyValue> = labels.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
                    obs.observe(value, &attrs);
                }
            };
            match kind {
                Kind::Gauge => {
                    meter.f64_observable_gauge(name).with_description(help).with_callback(move |o| observe(o)).build();
                }
                Kind::Counter => {
                    meter
                        .f64_observable_counter(name)
                        .with_description(help)
                        .with_callback(move |o| observe(o))
                        .build();
                }
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
