//! The worker's gRPC client: bearer token, optional TLS, and retries with backoff so that a
//! restarting coordinator is waited for rather than fatal.

use albef_config::CoordinatorConfig;
use albef_proto::v1::coordinator_client::CoordinatorClient;
use albef_proto::v1::{HeartbeatRequest, HeartbeatResponse};
use anyhow::{Context, Result};
use std::time::Duration;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A lazily connecting client: calls fail while the coordinator is down and succeed once it is back.
pub fn connect(cfg: &CoordinatorConfig) -> Result<Client> {
    let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
        .with_context(|| format!("coordinator.endpoint {:?}", cfg.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if cfg.endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if !cfg.tls_ca.is_empty() {
            let pem = std::fs::read(&cfg.tls_ca).with_context(|| format!("reading {}", cfg.tls_ca))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let token = if cfg.worker_token_file.is_empty() {
        None
    } else {
        let t = std::fs::read_to_string(&cfg.worker_token_file)
            .with_context(|| format!("reading the worker token {}", cfg.worker_token_file))?;
        Some(format!("Bearer {}", t.trim()).parse().context("the worker token is not valid ASCII")?)
    };
    Ok(CoordinatorClient::with_interceptor(endpoint.connect_lazy(), Bearer(token)))
}

/// Whether a failed call is worth repeating (coordinator restarting, rendezvous still open).
pub fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Calls `call` until it succeeds, fails for good, or has failed `tries` times (None: no limit),
/// backing off while the coordinator is unreachable (a transient error).
pub fn retry<T, F, Fut>(handle: &tokio::runtime::Handle, tries: Option<u32>, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let (mut backoff, mut tried) = (Backoff::new(), 0);
    loop {
        tried += 1;
        match handle.block_on(call()) {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(s) if transient(&s) && tries.is_none_or(|n| tried < n) => backoff.wait(),
            Err(s) => return Err(s),
        }
    }
}

/// Exponential backoff from 100 ms to 5 s.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }

    pub fn wait(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// This worker's heartbeats on one long-lived stream (a message each, not a call each: what
/// keeps a fleet's heartbeats cheap for the coordinator). A beat that fails drops the stream, and
/// the next one opens another: a restarted coordinator is reached again.
pub struct HeartbeatStream {
    client: Client,
    open: Option<(tokio::sync::mpsc::Sender<HeartbeatRequest>, tonic::Streaming<HeartbeatResponse>)>,
    /// How long a beat waits for its reply.
    timeout: Duration,
}

impl HeartbeatStream {
    pub fn new(client: Client, timeout: Duration) -> Self {
        HeartbeatStream { client, open: None, timeout }
    }

    /// Sends one beat and waits for its reply.
    pub async fn beat(&mut self, beat: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        let reply = tokio::time::timeout(self.timeout, self.exchange(beat)).await;
        let reply = reply.unwrap_or_else(|_| Err(Status::deadline_exceeded("no reply to a heartbeat")));
        if reply.is_err() {
            self.open = None;
        }
        reply
    }

    async fn exchange(&mut self, beat: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        let ended = || Status::unavailable("the coordinator ended the heartbeat stream");
        match &mut self.open {
            Some((tx, _)) => tx.send(beat).await.map_err(|_| ended())?,
            None => {
                // The first beat goes with the call (one in flight at a time: a channel of one).
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(beat).await.map_err(|_| ended())?;
                let replies = self.client.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
                self.open = Some((tx, replies.into_inner()));
            }
        }
        let (_, replies) = self.open.as_mut().expect("opened above");
        replies.message().await?.ok_or_else(ended)
    }
}
