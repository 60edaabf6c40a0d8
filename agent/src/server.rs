//! Wires the agent together: TLS listener, tower layers (audit, then authz),
//! the covet.agent.v1 services, gRPC health and reflection, the optional
//! Prometheus endpoint, and SIGHUP reloads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use covet_proto::v1 as pb;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::edge::api::{
    AgentState, BackupApi, InfoApi, LogApi, MetricsApi, OperationApi, ProbeApi, UnitApi, UpgradeApi,
};
use crate::edge::audit::AuditLog;
use crate::edge::authz::{Audit, Authz};
use crate::edge::layer::CallLayer;
use crate::edge::tls::ReloadableTls;

/// A bound, ready-to-serve agent.
pub struct Agent {
    state: AgentState,
    audit: AuditLog,
    tls: Arc<ReloadableTls>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
}

impl Agent {
    /// Prepares state, loads TLS material and binds the listeners; errors
    /// here are configuration errors an operator must fix.
    pub async fn bind(config: Config) -> anyhow::Result<Agent> {
        crate::host::info::agent_started();
        // Read the host's identity now, off the request path.
        crate::host::info::HostInfo::current();
        create_private_dir(&config.state_dir)?;
        // Backups are made later; a backup_dir not there yet (a disk still
        // to be mounted) is said, not fatal.
        if let Err(e) = crate::files::private::create_dir_all(&config.backup_dir) {
            tracing::warn!(
                "cannot create backup_dir {}: {e}",
                config.backup_dir.display()
            );
        }
        let audit_path = config.state_dir.join("audit.log");
        let audit = AuditLog::open(&audit_path)
            .with_context(|| format!("cannot open audit log {}", audit_path.display()))?;
        let tls = Arc::new(
            ReloadableTls::new(config.tls.clone(), config.limits.clone(), audit.clone())
                .context("cannot set up TLS from [tls]")?,
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on metrics_listen {addr}"))?,
            ),
            None => None,
        };
        let journal_path = config.state_dir.join("operations.redb");
        let oplog = Arc::new(
            crate::ops::log::OpLog::open(&journal_path).with_context(|| {
                format!(
                    "cannot open the operation journal {}",
                    journal_path.display()
                )
            })?,
        );
        let state = AgentState::new(Arc::new(config), oplog);
        let series = crate::series::SeriesSources {
            config: state.config.clone(),
            oplog: state.ops.oplog().clone(),
            backups: state.backups.clone(),
            policy: state.probe_policy.clone(),
        };
        state.metrics.set_more_series(Arc::new(move || {
            Box::pin(crate::series::render(series.clone()))
        }));
        recover(&state);
        Ok(Agent {
            state,
            audit,
            tls,
            listener,
            metrics_listener,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn tls(&self) -> Arc<ReloadableTls> {
        self.tls.clone()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Agent {
            state,
            audit,
            tls,
            listener,
            metrics_listener,
        } = self;
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = shutdown_tx.send(true);
        });

        if let Some(l) = metrics_listener {
            let hub = state.metrics.clone();
            let mut rx = shutdown_rx.clone();
            tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                };
                if let Err(e) = crate::host::metrics::serve_prometheus(l, hub, stop).await {
                    tracing::error!("metrics endpoint failed: {e}");
                }
            });
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in covet_proto::SERVICE_NAMES {
            health
                .set_service_status(*name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(covet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(covet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        let limit_layer =
            crate::edge::limits::LimitLayer::new(tls.deny_list(), &state.config.limits);
        let limits = &state.config.limits;
        let keepalive = std::time::Duration::from_millis(limits.keepalive_interval_ms.max(100));
        let keepalive_timeout =
            std::time::Duration::from_millis(limits.keepalive_timeout_ms.max(100));
        let incoming = crate::edge::tls::accept_loop(listener, tls);
        let mut rx = shutdown_rx;
        tonic::transport::Server::builder()
            // Dead peers are dropped: an unanswered PING ends the connection.
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .layer(CallLayer(Audit::new(audit)))
            .layer(CallLayer(limit_layer))
            .layer(CallLayer(Authz))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::info_service_server::InfoServiceServer::new(InfoApi(
                state.clone(),
            )))
            .add_service(pb::metrics_service_server::MetricsServiceServer::new(
                MetricsApi(state.clone()),
            ))
            .add_service(pb::probe_service_server::ProbeServiceServer::new(ProbeApi(
                state.clone(),
            )))
            .add_service(pb::unit_service_server::UnitServiceServer::new(UnitApi(
                state.clone(),
            )))
            .add_service(pb::log_service_server::LogServiceServer::new(LogApi(
                state.clone(),
            )))
            .add_service(pb::operation_service_server::OperationServiceServer::new(
                OperationApi(state.clone()),
            ))
            .add_service(pb::backup_service_server::BackupServiceServer::new(
                BackupApi(state.clone()),
            ))
            .add_service(pb::upgrade_service_server::UpgradeServiceServer::new(
                UpgradeApi(state.clone()),
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await
            .context("gRPC server failed")
    }
}

/// Ends operations that were running when the agent died: their work is
/// gone with the old process, so the journal must not show them running.
fn recover(state: &AgentState) {
    let unfinished = match state.ops.recover_unfinished() {
        Ok(ops) => ops,
        Err(e) => {
            tracing::error!("cannot read the operation journal: {e}");
            return;
        }
    };
    let apps: Vec<&str> = state.config.apps.iter().map(|a| a.name.as_str()).collect();
    state.backups.sweep_partial(&apps);
    let oplog = state.ops.oplog();
    for op in unfinished {
        tracing::warn!(op = %op.id, "operation was interrupted by an agent restart");
        if resume(state, &op) {
            continue;
        }
        let _ = oplog.append(
            &op.id,
            crate::ops::log::EventBody::Note {
                text: "the agent restarted while this operation ran; it was not finished".into(),
            },
        );
        let _ = oplog.append(
            &op.id,
            crate::ops::log::EventBody::StateChanged {
                state: crate::ops::log::OpState::Failed,
                cause: format!(
                    "interrupted by an agent restart during step {:?}",
                    op.current_step
                ),
            },
        );
    }
}

/// Hands an interrupted operation to the workflow when its crash policy
/// takes it over (see [`crate::workflow::finish_interrupted`]). Returns
/// whether it did.
fn resume(state: &AgentState, op: &crate::ops::log::OperationRecord) -> bool {
    let Some(app) = state.config.app(&op.app).cloned() else {
        return false;
    };
    if !crate::workflow::takes_over(op) {
        return false;
    }
    let deps = state.workflow_deps();
    let record = op.clone();
    let result = state.ops.resume(op, move |ctx| {
        Box::pin(crate::workflow::finish_interrupted(deps, ctx, app, record))
    });
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(op = %op.id, "cannot resume: {e}");
            false
        }
    }
}

/// Creates `dir` (and parents) with mode 0700, narrowing it if it was wider.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    crate::files::private::create_dir_all(dir)
        .with_context(|| format!("cannot create state_dir {}", dir.display()))
}
