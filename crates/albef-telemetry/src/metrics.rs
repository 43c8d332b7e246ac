//! A small metrics registry with one source of truth for two readers: the Prometheus text
//! endpoint (`/metrics`, scraped) and OpenTelemetry observable instruments (exported over OTLP).
//! Families are declared up front; their samples (label sets -> value) are set by the program,
//! or computed at read time by a refresh hook (the coordinator derives them from its job state).

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    /// A running total (never decreases within a process).
    Counter,
}

type Labels = Vec<(String, String)>;

struct Family {
    help: String,
    kind: Kind,
    samples: BTreeMap<Labels, f64>,
}

type Refresh = Box<dyn Fn(&Registry) + Send + Sync>;

/// Cheap to clone; every clone is the same registry.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
    refresh: Arc<Mutex<Option<Arc<Refresh>>>>,
}

impl Registry {
    /// A registry with these families (name, kind, help).
    pub fn with_families(families: &[(&str, Kind, &str)]) -> Registry {
        let r = Registry::default();
        for (name, kind, help) in families {
            r.declare(name, *kind, help);
        }
        r
    }

    /// Declares a family (idempotent).
    pub fn declare(&self, name: &str, kind: Kind, help: &str) {
        self.families.lock().unwrap().entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            kind,
            samples: BTreeMap::new(),
        });
    }

    /// Sets one sample of a declared family.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let mut families = self.families.lock().unwrap();
        let family = families.get_mut(name).unwrap_or_else(|| panic!("metric {name} was not declared"));
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        family.samples.insert(labels, value);
    }

    /// Drops every sample of a family (label sets that no longer exist, e.g. departed workers).
    pub fn clear(&self, name: &str) {
        if let Some(f) = self.families.lock().unwrap().get_mut(name) {
            f.samples.clear();
        }
    }

    /// Runs before every read, to compute the samples from the program's state.
    pub fn on_read(&self, refresh: impl Fn(&Registry) + Send + Sync + 'static) {
        *self.refresh.lock().unwrap() = Some(Arc::new(Box::new(refresh)));
    }

    fn refreshed(&self) {
        let hook = self.refresh.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(self);
        }
    }

    /// Family names, kinds and help texts.
    pub fn families(&self) -> Vec<(String, Kind, String)> {
        self.families.lock().unwrap().iter().map(|(n, f)| (n.clone(), f.kind, f.help.clone())).collect()
    }

    /// The current samples of one family.
    pub fn samples(&self, name: &str) -> Vec<(Labels, f64)> {
        self.refreshed();
        self.families.lock().unwrap().get(name).map(|f| f.samples.clone().into_iter().collect()).unwrap_or_default()
    }

    /// The Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        self.refreshed();
        let mut out = String::new();
        for (name, f) in self.families.lock().unwrap().iter() {
            let kind = match f.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            let _ = writeln!(out, "# HELP {name} {}", f.help.replace('\\', "\\\\").replace('\n', "\\n"));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in &f.samples {
                let _ = writeln!(out, "{name}{} {}", render_labels(labels), render_value(*value));
            }
        }
        out
    }
}

fn render_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let escaped: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", escaped.join(","))
}

fn render_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped (a plain HTTP/1.1 responder:
/// one request per connection).
pub async fn serve_prometheus(listener: TcpListener, registry: Registry) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                ("200 OK", registry.render())
            } else {
                ("404 Not Found", "only /metrics is served here\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds `addr` and serves the registry there in the background of the current runtime;
/// returns the bound address.
pub async fn spawn_prometheus(addr: &str, registry: Registry) -> Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("metrics endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve_prometheus(listener, registry));
    tracing::info!(%bound, "Prometheus metrics on /metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_format_escapes_and_orders() {
        let r = Registry::default();
        r.declare("albef_step", Kind::Gauge, "Optimiser steps.");
        r.declare("albef_bad_samples_total", Kind::Counter, "Skipped samples.");
        r.set("albef_step", &[], 12.0);
        r.set("albef_bad_samples_total", &[("reason", "corrupt \"jpeg\"")], 3.0);
        r.set("albef_bad_samples_total", &[("reason", "empty")], f64::INFINITY);
        let text = r.render();
        assert_eq!(
            text,
            "# HELP albef_bad_samples_total Skipped samples.\n# TYPE albef_bad_samples_total counter\n\
             albef_bad_samples_total{reason=\"corrupt \\\"jpeg\\\"\"} 3\nalbef_bad_samples_total{reason=\"empty\"} +Inf\n\
             # HELP albef_step Optimiser steps.\n# TYPE albef_step gauge\nalbef_step 12\n"
        );
        r.on_read(|r| r.set("albef_step", &[], 13.0));
        assert!(r.render().contains("albef_step 13\n"));
    }
}
