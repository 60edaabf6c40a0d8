//! Where a command goes: the context's (or `-e`'s) endpoints and
//! credentials, and a connection to one agent.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use covetctl::connect::{self, Credentials};
use covetctl::contexts::ClientConfig;
use tonic::transport::Channel;

use crate::Global;

/// A connection to one agent, with what is needed to describe its errors.
pub struct Node {
    pub endpoint: String,
    pub channel: Channel,
}

impl Node {
    /// Turns a failed call into an error naming the endpoint and the cause.
    pub fn fail(&self, status: tonic::Status) -> anyhow::Error {
        anyhow!(connect::describe_status(&self.endpoint, &status))
    }

    /// Prints a server stream's messages until it ends or the user interrupts.
    pub async fn print_stream<T>(
        &self,
        mut stream: tonic::Streaming<T>,
        mut print: impl FnMut(T),
    ) -> anyhow::Result<ExitCode> {
        loop {
            tokio::select! {
                next = stream.message() => match next.map_err(|s| self.fail(s))? {
                    Some(message) => print(message),
                    None => return Ok(ExitCode::SUCCESS),
                },
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        }
    }
}

/// Connects to the agent named by `-e` or the context; every call has
/// `--timeout` as its deadline.
pub async fn connect_node(g: &Global) -> anyhow::Result<Node> {
    connect_node_with(g, g.timeout).await
}

/// As [`connect_node`], with a longer deadline for calls that wait on work
/// (a unit's job, a migration's dry run).
pub async fn connect_node_with(g: &Global, call_timeout: Duration) -> anyhow::Result<Node> {
    let target = Target::resolve(g)?;
    let endpoint = target.endpoints.first().cloned().ok_or_else(|| {
        anyhow!(
            "context {} has no endpoint: pass -e HOST:PORT",
            target.context
        )
    })?;
    let tls = target.tls()?;
    target
        .connect(&endpoint, tls, g.timeout, call_timeout)
        .await
}

/// Where a command goes and with which credentials: the context (or the one
/// named by `--context`), its endpoints unless `-e` overrides them.
pub struct Target {
    pub context: String,
    pub endpoints: Vec<String>,
    credentials: Credentials,
    server_name: Option<String>,
}

impl Target {
    pub fn resolve(g: &Global) -> anyhow::Result<Target> {
        let path = match &g.config {
            Some(p) => p.clone(),
            None => covetctl::contexts::default_path()?,
        };
        let config = ClientConfig::load(&path)?;
        let (name, ctx) = match &g.context {
            Some(name) => (
                name.as_str(),
                config.contexts.get(name).ok_or_else(|| {
                    anyhow!(
                        "no context {name:?} in {} (have: {})",
                        path.display(),
                        config
                            .contexts
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
            ),
            None => config.current()?,
        };
        let endpoints = if g.endpoints.is_empty() {
            ctx.endpoints.clone()
        } else {
            g.endpoints.clone()
        };
        Ok(Target {
            context: name.to_owned(),
            endpoints,
            credentials: Credentials {
                ca: ctx.ca.clone(),
                cert: ctx.cert.clone(),
                key: ctx.key.clone(),
            },
            server_name: ctx.server_name.clone(),
        })
    }

    /// The client TLS configuration. Build it once per command and share it:
    /// one config caches the TLS sessions every connection resumes.
    pub fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(connect::client_tls(&self.credentials)?)
    }

    pub async fn connect(
        &self,
        endpoint: &str,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
        call_timeout: Duration,
    ) -> anyhow::Result<Node> {
        let channel = connect::connect_with(
            endpoint,
            tls,
            self.server_name.as_deref(),
            timeout,
            call_timeout,
        )
        .await?;
        Ok(Node {
            endpoint: endpoint.to_owned(),
            channel,
        })
    }
}
