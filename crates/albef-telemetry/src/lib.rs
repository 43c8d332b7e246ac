//! Telemetry setup shared by every albef binary.

/// Logs to stderr at the level `RUST_LOG` asks for (default `info`), keeping stdout for the
/// program's own output (progress lines, tables, JSON).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
