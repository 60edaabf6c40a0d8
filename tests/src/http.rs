//! A small real HTTP server on loopback with scripted routes, standing in
//! for an app's /health and smoke endpoints; and the client side tests use
//! to see which version an app on loopback serves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// What a route answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_owned(),
            delay: Duration::ZERO,
        }
    }

    pub fn slow(self, delay: Duration) -> Reply {
        Reply { delay, ..self }
    }
}

/// Serves `routes` (path -> reply) until dropped; unknown paths get 404.
pub struct HttpServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(routes: &[(&str, Reply)]) -> HttpServer {
        let routes: Arc<HashMap<String, Reply>> = Arc::new(
            routes
                .iter()
                .map(|(p, r)| ((*p).to_owned(), r.clone()))
                .collect(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let routes = routes.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let routes = routes.clone();
                        async move {
                            let reply = routes.get(req.uri().path()).cloned().unwrap_or(Reply {
                                status: 404,
                                body: "not found".into(),
                                delay: Duration::ZERO,
                            });
                            tokio::time::sleep(reply.delay).await;
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from(reply.body)));
                            *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
                                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        HttpServer { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /health` on 127.0.0.1:`port`: the status and the JSON body, or None
/// when nothing answers with JSON.
pub fn health(port: u16) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status: u16 = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1)?;
    Some((status, serde_json::from_str(body).ok()?))
}

/// Whether the app on `port` answers 200 with `version` within 10 s.
pub async fn serving(port: u16, version: &str) -> bool {
    for _ in 0..100 {
        if let Some((200, body)) = health(port)
            && body["version"] == version
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// [`serving`], panicking with what the app answers instead.
pub async fn wait_healthy(port: u16, version: &str) {
    if !serving(port, version).await {
        panic!(
            "the app on port {port} did not become healthy at {version}: {:?}",
            health(port)
        );
    }
}
