//! Bearer-token authentication: `authorization: Bearer <token>` on every Coordinator and Control
//! call. The worker token opens the Coordinator service only; the admin token opens both. Health
//! and reflection stay open for probes. Without any token file, authentication is off.

use anyhow::{Context, Result, ensure};
use std::sync::Arc;
use tonic::{Request, Status};

#[derive(Clone, Copy, Debug)]
pub enum Guard {
    /// The worker protocol: worker or admin token.
    Coordinator,
    /// Job control: admin token only.
    Control,
}

#[derive(Clone, Debug, Default)]
pub struct Auth {
    worker: Option<Arc<[u8]>>,
    admin: Option<Arc<[u8]>>,
}

fn read_token(kind: &str, path: &str) -> Result<Option<Arc<[u8]>>> {
    if path.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the {kind} token file {path}"))?;
    let token = text.trim();
    // An empty secret would let anyone in who sends "Bearer ".
    ensure!(!token.is_empty(), "the {kind} token file {path} is empty");
    Ok(Some(token.as_bytes().into()))
}

impl Auth {
    /// Tokens from files (surrounding whitespace trimmed); an empty path configures no token.
    pub fn from_files(worker_file: &str, admin_file: &str) -> Result<Self> {
        Ok(Auth { worker: read_token("worker", worker_file)?, admin: read_token("admin", admin_file)? })
    }

    pub fn enabled(&self) -> bool {
        self.worker.is_some() || self.admin.is_some()
    }

    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    /// The interceptor of the service that `guard` names.
    pub fn interceptor(&self, guard: Guard) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let auth = self.clone();
        move |request: Request<()>| auth.check(guard, &request).map(|()| request)
    }

    fn check(&self, guard: Guard, request: &Request<()>) -> Result<(), Status> {
        if !self.enabled() {
            return Ok(());
        }
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(bearer) else {
            return Err(Status::unauthenticated("missing bearer token (authorization: Bearer <token>)"));
        };
        let matches =
            |known: &Option<Arc<[u8]>>| known.as_deref().is_some_and(|k| constant_time_eq(k, token.as_bytes()));
        // Both comparisons always run, so timing does not tell which token was close.
        let (admin, worker) = (matches(&self.admin), matches(&self.worker));
        match (guard, admin, worker) {
            (_, true, _) | (Guard::Coordinator, _, true) => Ok(()),
            (Guard::Control, false, true) => Err(Status::permission_denied("the worker token cannot control the job")),
            _ => Err(Status::unauthenticated("invalid token")),
        }
    }
}

fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference (only the length can leak).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).copied().unwrap_or(0), b.get(i).copied().unwrap_or(0));
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth { worker: Some(b"w-secret".as_slice().into()), admin: Some(b"a-secret".as_slice().into()) }
    }

    fn call(auth: &Auth, guard: Guard, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        auth.check(guard, &request).map_err(|s| s.code())
    }

    #[test]
    fn tokens_open_their_services() {
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let a = auth();
        assert_eq!(call(&a, Guard::Coordinator, Some("Bearer w-secret")), Ok(()));
        assert_eq!(call(&a, Guard::Coordinator, Some("bearer  a-secret ")), Ok(()));
        assert_eq!(call(&a, Guard::Control, Some("Bearer a-secret")), Ok(()));
        assert_eq!(call(&a, Guard::Control, Some("Bearer w-secret")), Err(PermissionDenied));
        assert_eq!(call(&a, Guard::Coordinator, None), Err(Unauthenticated));
        assert_eq!(call(&a, Guard::Coordinator, Some("Bearer w-secre")), Err(Unauthenticated));
        assert_eq!(call(&a, Guard::Coordinator, Some("Basic w-secret")), Err(Unauthenticated));
        assert_eq!(call(&a, Guard::Control, Some("Bearer")), Err(Unauthenticated));
        assert_eq!(call(&Auth::default(), Guard::Control, None), Ok(()), "no token files: open");
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (w, e) = (dir.path().join("w"), dir.path().join("e"));
        std::fs::write(&w, "  w-secret\n").unwrap();
        std::fs::write(&e, " \n").unwrap();
        let a = Auth::from_files(w.to_str().unwrap(), "").unwrap();
        assert_eq!(a.worker.as_deref(), Some(b"w-secret".as_slice()));
        assert!(a.enabled() && !a.has_admin());
        assert!(Auth::from_files("", e.to_str().unwrap()).is_err());
        assert!(Auth::from_files("/nonexistent/token", "").is_err());
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
    }
}
