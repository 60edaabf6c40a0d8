//! The tower plumbing the edge's layers share. Each layer is a [`CallFilter`]:
//! it looks at one call and answers it, or passes it on (maybe wrapping the
//! response). [`CallLayer`] makes any filter a tower layer, so audit, limits
//! and authz hold only their own logic.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body as TonicBody;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The response to one call, or the inner service's error.
pub(crate) type CallFuture<E> = BoxFuture<Result<http::Response<TonicBody>, E>>;

/// What a layer does with one call. `next` hands the call to the layers
/// and the service behind this one.
pub(crate) trait CallFilter: Clone {
    fn filter<B, E: Send + 'static>(
        &self,
        req: http::Request<B>,
        next: impl FnOnce(http::Request<B>) -> CallFuture<E>,
    ) -> CallFuture<E>;
}

/// A [`CallFilter`] as a tower layer.
#[derive(Clone)]
pub(crate) struct CallLayer<F>(pub F);

impl<F: Clone, S> tower_layer::Layer<S> for CallLayer<F> {
    type Service = Filtered<F, S>;
    fn layer(&self, inner: S) -> Filtered<F, S> {
        Filtered {
            filter: self.0.clone(),
            inner,
        }
    }
}

/// The service a [`CallLayer`] puts in front of `inner`.
#[derive(Clone)]
pub(crate) struct Filtered<F, S> {
    filter: F,
    inner: S,
}

impl<F, S, B> tower_service::Service<http::Request<B>> for Filtered<F, S>
where
    F: CallFilter,
    S: tower_service::Service<http::Request<B>, Response = http::Response<TonicBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = S::Error;
    type Future = CallFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = &mut self.inner;
        self.filter.filter(req, |req| Box::pin(inner.call(req)))
    }
}

/// A call answered here with `status`, never reaching the service.
pub(crate) fn refuse<E: Send + 'static>(status: tonic::Status) -> CallFuture<E> {
    Box::pin(std::future::ready(Ok(status.into_http())))
}
