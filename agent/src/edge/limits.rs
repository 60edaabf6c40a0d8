//! The limits layer: refuses calls of certificates revoked since their
//! connection opened (and ends their open streams), and caps calls per
//! connection and follows/watches per identity with RESOURCE_EXHAUSTED.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body as TonicBody;

use crate::config::LimitsConfig;
use crate::edge::identity::PeerIdentity;
use crate::edge::layer::{BoxFuture, CallFilter, CallFuture, refuse};
use crate::edge::tls::{DenyList, PeerInfo};

/// Long-lived calls that hold agent resources (a `journalctl --follow`, a
/// sampler, a journal subscription) for as long as the client keeps them.
pub const FOLLOWS: &[&str] = &[
    "/covet.agent.v1.LogService/FollowLogs",
    "/covet.agent.v1.MetricsService/WatchMetrics",
    "/covet.agent.v1.OperationService/WatchOperation",
    "/grpc.health.v1.Health/Watch",
];

pub fn is_follow(method: &str) -> bool {
    FOLLOWS.contains(&method)
}

/// The answer for a call of a revoked certificate.
pub fn revoked_status(id: &PeerIdentity) -> Status {
    Status::permission_denied(format!(
        "certificate CN={} (serial {}) is revoked (deny list); this connection may no longer call",
        id.common_name, id.serial
    ))
}

/// Open follows per identity (certificate fingerprint).
#[derive(Default)]
struct FollowCounts(Mutex<HashMap<String, usize>>);

/// A held unit of some count; given back on drop.
enum Held {
    Call(Arc<AtomicUsize>),
    Follow(Arc<FollowCounts>, String),
}

impl Drop for Held {
    fn drop(&mut self) {
        match self {
            Held::Call(open) => {
                open.fetch_sub(1, Ordering::AcqRel);
            }
            Held::Follow(counts, key) => {
                let mut map = counts.0.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = map.get_mut(key.as_str()) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        map.remove(key.as_str());
                    }
                }
            }
        }
    }
}

/// Takes one call slot on the connection, or says why not.
fn take_call(peer: &PeerInfo, max: usize) -> Result<Held, Status> {
    let open = peer.open_calls.fetch_add(1, Ordering::AcqRel);
    let held = Held::Call(peer.open_calls.clone());
    if open >= max {
        return Err(Status::resource_exhausted(format!(
            "this connection already has {max} calls open, the most one connection may hold; end some streams or open another connection"
        )));
    }
    Ok(held)
}

fn take_follow(counts: &Arc<FollowCounts>, id: &PeerIdentity, max: usize) -> Result<Held, Status> {
    let mut map = counts.0.lock().unwrap_or_else(|p| p.into_inner());
    let n = map.entry(id.fingerprint_sha256.clone()).or_default();
    if *n >= max {
        return Err(Status::resource_exhausted(format!(
            "certificate CN={} already has {max} follows/watches open (FollowLogs, WatchMetrics, WatchOperation, Health/Watch), the most one identity may hold; end some first",
            id.common_name
        )));
    }
    *n += 1;
    Ok(Held::Follow(counts.clone(), id.fingerprint_sha256.clone()))
}

/// Tower layer; sits inside the audit layer so its refusals are audited.
#[derive(Clone)]
pub struct LimitLayer {
    deny: watch::Receiver<Arc<DenyList>>,
    follows: Arc<FollowCounts>,
    streams_per_connection: usize,
    follows_per_identity: usize,
}

impl LimitLayer {
    pub fn new(deny: watch::Receiver<Arc<DenyList>>, limits: &LimitsConfig) -> LimitLayer {
        LimitLayer {
            deny,
            follows: Arc::default(),
            streams_per_connection: limits.streams_per_connection.max(1),
            follows_per_identity: limits.follows_per_identity.max(1),
        }
    }
}

impl CallFilter for LimitLayer {
    fn filter<B, E: Send + 'static>(
        &self,
        req: http::Request<B>,
        next: impl FnOnce(http::Request<B>) -> CallFuture<E>,
    ) -> CallFuture<E> {
        // No peer: the authz layer answers UNAUTHENTICATED.
        let Some(peer) = req.extensions().get::<PeerInfo>().cloned() else {
            return next(req);
        };
        let layer = self;
        if layer.deny.borrow().denies(&peer.identity) {
            return refuse(revoked_status(&peer.identity));
        }
        let mut held = Vec::with_capacity(2);
        match take_call(&peer, layer.streams_per_connection) {
            Ok(h) => held.push(h),
            Err(status) => return refuse(status),
        }
        if is_follow(req.uri().path()) {
            match take_follow(&layer.follows, &peer.identity, layer.follows_per_identity) {
                Ok(h) => held.push(h),
                Err(status) => return refuse(status),
            }
        }
        let mut deny = layer.deny.clone();
        let identity = peer.identity.clone();
        let revoked: BoxFuture<Status> = Box::pin(async move {
            if deny.wait_for(|d| d.denies(&identity)).await.is_err() {
                // The agent is shutting down; its own drain ends the call.
                std::future::pending::<()>().await;
            }
            revoked_status(&identity)
        });
        let call = next(req);
        Box::pin(async move {
            let response = call.await?;
            let (parts, body) = response.into_parts();
            let body = LimitedBody {
                inner: body,
                revoked: Some(revoked),
                _held: held,
            };
            Ok(http::Response::from_parts(parts, TonicBody::new(body)))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds the call's slots until it is dropped, and
    /// ends with PERMISSION_DENIED once the caller's certificate is revoked.
    struct LimitedBody {
        #[pin]
        inner: TonicBody,
        revoked: Option<BoxFuture<Status>>,
        _held: Vec<Held>,
    }
}

impl Body for LimitedBody {
    type Data = <TonicBody as Body>::Data;
    type Error = <TonicBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let Some(revoked) = this.revoked.as_mut() else {
            // Revoked: the trailers went out; the stream is over.
            return Poll::Ready(None);
        };
        if let Poll::Ready(status) = revoked.as_mut().poll(cx) {
            *this.revoked = None;
            this._held.clear();
            // A trailers-only response's headers are the status trailers.
            let mut trailers = status.into_http::<()>().into_parts().0.headers;
            trailers.remove(http::header::CONTENT_TYPE);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.revoked.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the open-files soft limit to the hard limit: each connection is
/// a descriptor, and the soft default (often 1024) is what an idle-socket
/// flood exhausts first.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                tracing::warn!(
                    "cannot raise the open-files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_table_names_served_streaming_methods() {
        for method in FOLLOWS {
            assert!(
                crate::edge::authz::RULES
                    .iter()
                    .any(|r| r.method == *method),
                "{method} is not in authz::RULES"
            );
        }
        assert!(is_follow("/covet.agent.v1.LogService/FollowLogs"));
        assert!(!is_follow("/covet.agent.v1.LogService/TailLogs"));
    }

    #[test]
    fn open_files_soft_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain get/setrlimit on our own test process.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            let lowered = libc::rlimit {
                rlim_cur: limit.rlim_max.min(256),
                rlim_max: limit.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lowered), 0);
        }
        raise_open_files_limit();
        let mut now = limit;
        // SAFETY: as above.
        unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut now), 0) };
        assert_eq!(now.rlim_cur, limit.rlim_max);
    }
}
