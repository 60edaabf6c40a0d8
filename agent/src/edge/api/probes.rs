//! ProbeService: an app's declared health and smoke checks, and ad-hoc
//! HTTP and TCP probes of targets the configuration declares.

use std::time::Duration;

use covet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::operations::analysis_event_to_pb;
use super::{AgentState, duration, duration_arg, name_error};
use crate::analysis;
use crate::config::Config;
use crate::edge::audit::set_target;
use crate::host::systemd::ControlledUnit;
use crate::names::AppName;
use crate::probes::{
    self, AppHealth, Attempts, HttpProbeSpec, ProbeError, ProbeOutcome, ProbeSpec, TcpProbeSpec,
};

pub struct ProbeApi(pub AgentState);

/// CheckAppHealth: a declared app that declares a health probe.
#[derive(Debug)]
struct CheckAppHealth {
    app: AppName,
    health: ProbeSpec,
    /// Empty unless the request asked for them.
    smoke: Vec<ProbeSpec>,
}

/// `serving_port`: the live slot's, where the probes go instead of the
/// declared port (blue-green and canary apps).
fn parse_check_app_health(
    req: pb::CheckAppHealthRequest,
    config: &Config,
    serving_port: impl Fn(&crate::config::AppConfig) -> Option<u16>,
) -> Result<CheckAppHealth, Status> {
    let app = AppName::declared(config, &req.app).map_err(name_error)?;
    let Some(health) = &app.config().health else {
        return Err(Status::failed_precondition(format!(
            "app {} declares no health probe ([app.health] in the agent's configuration)",
            app.as_str()
        )));
    };
    let name = app.as_str();
    let port = serving_port(app.config());
    let moved = |p: &crate::config::ProbeConfig| match port {
        Some(port) => p.on_port(port),
        None => p.clone(),
    };
    let health = moved(health).spec(name, "health").map_err(probe_error)?;
    let smoke = match req.include_smoke {
        true => app
            .config()
            .smoke
            .iter()
            .map(|check| moved(check).spec(name, "smoke").map_err(probe_error))
            .collect::<Result<_, _>>()?,
        false => Vec::new(),
    };
    Ok(CheckAppHealth { app, health, smoke })
}

/// AnalyzeApp: a declared app with analysis rules, and the interval.
#[derive(Debug)]
struct AnalyzeApp {
    app: AppName,
    interval: Duration,
}

fn parse_analyze_app(req: pb::AnalyzeAppRequest, config: &Config) -> Result<AnalyzeApp, Status> {
    let app = AppName::declared(config, &req.app).map_err(name_error)?;
    if app.config().analysis.is_empty() {
        return Err(Status::failed_precondition(format!(
            "app {} declares no analysis rules ([[app.analysis]] in the agent's configuration)",
            app.as_str()
        )));
    }
    let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
    let default = analysis::timing(app.config()).0.clamp(min, max);
    let interval = duration_arg("interval", req.interval, default, min, max)?;
    Ok(AnalyzeApp { app, interval })
}

/// Timeout, retries and interval of an ad-hoc probe.
fn parse_attempts(
    timeout: Option<prost_types::Duration>,
    retries: u32,
    interval: Option<prost_types::Duration>,
) -> Result<Attempts, Status> {
    if retries > probes::MAX_RETRIES {
        return Err(Status::invalid_argument(format!(
            "retries must be at most {}, got {retries}",
            probes::MAX_RETRIES
        )));
    }
    Ok(Attempts {
        timeout: duration_arg(
            "timeout",
            timeout,
            Duration::from_secs(5),
            Duration::from_millis(10),
            probes::MAX_TIMEOUT,
        )?,
        retries,
        interval: duration_arg(
            "interval",
            interval,
            Duration::from_secs(1),
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?,
    })
}

/// ProbeHttp. The target itself is checked against the declared targets
/// when probed (the policy resolves names).
fn parse_probe_http(req: pb::HttpProbe) -> Result<HttpProbeSpec, Status> {
    let expect_status = match req.expect_status {
        0 => 200,
        s @ 100..=599 => s as u16,
        s => {
            return Err(Status::invalid_argument(format!(
                "expect_status must be an HTTP status (100-599), got {s}"
            )));
        }
    };
    if req.json_field.is_empty() && !req.json_value.is_empty() {
        return Err(Status::invalid_argument("json_value needs json_field"));
    }
    Ok(HttpProbeSpec {
        name: if req.name.is_empty() {
            req.url.clone()
        } else {
            req.name
        },
        url: req.url,
        expect_status,
        json_field: Some(req.json_field).filter(|f| !f.is_empty()),
        json_value: Some(req.json_value),
        attempts: parse_attempts(req.timeout, req.retries, req.interval)?,
    })
}

fn parse_probe_tcp(req: pb::TcpProbe) -> Result<TcpProbeSpec, Status> {
    Ok(TcpProbeSpec {
        name: if req.name.is_empty() {
            req.address.clone()
        } else {
            req.name
        },
        address: req.address,
        attempts: parse_attempts(req.timeout, req.retries, req.interval)?,
    })
}

fn probe_error(e: ProbeError) -> Status {
    match e {
        ProbeError::InvalidTarget(m) => Status::invalid_argument(m),
        ProbeError::NotAllowed(_) => Status::permission_denied(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::probe_service_server::ProbeService for ProbeApi {
    async fn check_app_health(
        &self,
        request: Request<pb::CheckAppHealthRequest>,
    ) -> Result<Response<pb::CheckAppHealthResponse>, Status> {
        let req = parse_check_app_health(request.into_inner(), &self.0.config, |app| {
            crate::deploy::serving_slot(app).map(|(_, port)| port)
        })?;
        let found = probes::check_app(&self.0.probe_policy, &req.health, &req.smoke)
            .await
            .map_err(probe_error)?;
        let mut response = app_health_to_pb(req.app.as_str(), found);
        response.version = crate::deploy::serving_version(req.app.config())
            .await
            .unwrap_or_default();
        response.slot = crate::deploy::serving_slot(req.app.config())
            .map(|(slot, _)| slot)
            .unwrap_or_default();
        Ok(Response::new(response))
    }

    async fn analyze_app(
        &self,
        request: Request<pb::AnalyzeAppRequest>,
    ) -> Result<Response<pb::AnalyzeAppResponse>, Status> {
        let req = parse_analyze_app(request.into_inner(), &self.0.config)?;
        let app = req.app.config();
        let rules = analysis::rules_of(app).map_err(Status::failed_precondition)?;
        let unit = ControlledUnit::admit(&*self.0.config, &app.unit)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let sources = analysis::Sources::of(
            app,
            &rules,
            self.0.probe_policy.clone(),
            self.0.systemd.clone(),
            unit,
        )
        .await
        .map_err(Status::unavailable)?;
        let readings = analysis::now(&sources, rules, req.interval)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(pb::AnalyzeAppResponse {
            app: req.app.as_str().to_owned(),
            readings: readings
                .into_iter()
                .map(|r| analysis_event_to_pb(crate::workflow::reading_event(None, r)))
                .collect(),
        }))
    }

    async fn probe_http(
        &self,
        request: Request<pb::HttpProbe>,
    ) -> Result<Response<pb::ProbeResult>, Status> {
        set_target(&request, format!("url={}", request.get_ref().url));
        let spec = parse_probe_http(request.into_inner())?;
        let outcome = probes::probe_http(&self.0.probe_policy, &spec)
            .await
            .map_err(probe_error)?;
        Ok(Response::new(outcome_to_pb(outcome)))
    }

    async fn probe_tcp(
        &self,
        request: Request<pb::TcpProbe>,
    ) -> Result<Response<pb::ProbeResult>, Status> {
        let spec = parse_probe_tcp(request.into_inner())?;
        let outcome = probes::probe_tcp(&self.0.probe_policy, &spec)
            .await
            .map_err(probe_error)?;
        Ok(Response::new(outcome_to_pb(outcome)))
    }
}

fn app_health_to_pb(app: &str, found: AppHealth) -> pb::CheckAppHealthResponse {
    pb::CheckAppHealthResponse {
        app: app.to_owned(),
        healthy: found.healthy,
        health: Some(outcome_to_pb(found.health)),
        smoke: found.smoke.into_iter().map(outcome_to_pb).collect(),
        ..Default::default()
    }
}

fn outcome_to_pb(o: ProbeOutcome) -> pb::ProbeResult {
    pb::ProbeResult {
        name: o.name,
        target: o.target,
        ok: o.ok,
        attempts: o.attempts,
        latency: Some(duration(o.latency)),
        http_status: u32::from(o.http_status),
        error: o.error,
        body_excerpt: o.body_excerpt,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, refused, secs};
    use super::*;
    use tonic::Code;

    #[test]
    fn app_health_needs_a_declared_app_with_a_health_probe() {
        let config = config();
        let parse_on = |app: &str, port: Option<u16>| {
            parse_check_app_health(
                pb::CheckAppHealthRequest {
                    app: app.into(),
                    include_smoke: true,
                },
                &config,
                |_| port,
            )
        };
        let parse = |app: &str| parse_on(app, None);
        let ok = parse("covet").unwrap();
        assert_eq!(ok.app.as_str(), "covet");
        let ProbeSpec::Http(health) = &ok.health else {
            panic!("an http health probe: {:?}", ok.health);
        };
        assert_eq!(health.url, "http://127.0.0.1:8000/health");
        // A live slot's port replaces the declared one, path kept.
        let ProbeSpec::Http(health) = parse_on("covet", Some(8002)).unwrap().health else {
            panic!("an http health probe");
        };
        assert_eq!(health.url, "http://127.0.0.1:8002/health");
        refused(parse(""), Code::InvalidArgument, "app is required");
        refused(parse("nope"), Code::NotFound, "app \"nope\"");
        refused(parse("bare"), Code::FailedPrecondition, "[app.health]");
    }

    #[test]
    fn analysis_needs_a_declared_app_with_rules_and_a_sane_interval() {
        let config = config();
        let parse = |app: &str, interval: Option<prost_types::Duration>| {
            parse_analyze_app(
                pb::AnalyzeAppRequest {
                    app: app.into(),
                    interval,
                },
                &config,
            )
        };
        let ok = parse("covet", None).unwrap();
        assert_eq!(ok.interval, Duration::from_secs(5), "the app's interval");
        assert_eq!(
            parse("covet", secs(2)).unwrap().interval,
            Duration::from_secs(2)
        );
        refused(parse("", None), Code::InvalidArgument, "app is required");
        refused(parse("nope", None), Code::NotFound, "app \"nope\"");
        refused(
            parse("bare", None),
            Code::FailedPrecondition,
            "[[app.analysis]]",
        );
        refused(parse("covet", secs(600)), Code::InvalidArgument, "interval");
        refused(parse("covet", secs(-1)), Code::InvalidArgument, "interval");
    }

    #[test]
    fn an_http_probe_defaults_its_name_status_and_attempts() {
        let spec = parse_probe_http(pb::HttpProbe {
            url: "http://127.0.0.1:8000/health".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(spec.name, "http://127.0.0.1:8000/health");
        assert_eq!(spec.expect_status, 200);
        assert_eq!(spec.json_field, None);
        assert_eq!(spec.attempts.timeout, Duration::from_secs(5));
        assert_eq!(spec.attempts.interval, Duration::from_secs(1));
        assert_eq!(spec.attempts.retries, 0);
        let spec = parse_probe_http(pb::HttpProbe {
            url: "http://127.0.0.1:8000/".into(),
            name: "home".into(),
            expect_status: 204,
            json_field: "status".into(),
            json_value: "ok".into(),
            timeout: secs(60),
            retries: 30,
            interval: secs(2),
        })
        .unwrap();
        assert_eq!(
            (
                spec.name.as_str(),
                spec.expect_status,
                spec.attempts.retries
            ),
            ("home", 204, 30)
        );
        assert_eq!(spec.json_field.as_deref(), Some("status"));
    }

    #[test]
    fn an_http_probe_out_of_range_is_refused_naming_the_field() {
        let probe = |f: fn(&mut pb::HttpProbe)| {
            let mut p = pb::HttpProbe {
                url: "http://127.0.0.1:8000/".into(),
                ..Default::default()
            };
            f(&mut p);
            parse_probe_http(p)
        };
        for status in [1, 99, 600, u32::MAX] {
            let r = parse_probe_http(pb::HttpProbe {
                expect_status: status,
                ..Default::default()
            });
            refused(r, Code::InvalidArgument, "expect_status");
        }
        refused(
            probe(|p| p.json_value = "ok".into()),
            Code::InvalidArgument,
            "json_value needs json_field",
        );
        refused(
            probe(|p| p.retries = 31),
            Code::InvalidArgument,
            "retries must be at most 30",
        );
        refused(
            probe(|p| p.timeout = secs(61)),
            Code::InvalidArgument,
            "timeout",
        );
        refused(
            probe(|p| p.timeout = secs(-1)),
            Code::InvalidArgument,
            "timeout",
        );
        refused(
            probe(|p| p.interval = secs(61)),
            Code::InvalidArgument,
            "interval",
        );
    }

    #[test]
    fn a_tcp_probe_is_named_by_its_address_and_bounded_like_http() {
        let spec = parse_probe_tcp(pb::TcpProbe {
            address: "127.0.0.1:5432".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.address.as_str()),
            ("127.0.0.1:5432", "127.0.0.1:5432")
        );
        let r = parse_probe_tcp(pb::TcpProbe {
            address: "127.0.0.1:5432".into(),
            retries: 100,
            ..Default::default()
        });
        refused(r, Code::InvalidArgument, "retries");
        let r = parse_probe_tcp(pb::TcpProbe {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
            ..Default::default()
        });
        refused(r, Code::InvalidArgument, "interval must be between");
    }
}
