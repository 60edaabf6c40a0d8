//! The agent's own series on `metrics_listen`, beside the host's, for a
//! fleet's Prometheus: per app its installed version (an `info` series),
//! its health (probed at the scrape, one attempt), its operations by kind
//! and outcome and their durations, its last backup, and its analysis
//! rules' latest readings. All are read at the scrape from the
//! configuration, the operation log and the backup store, so they survive
//! restarts and need no bookkeeping on the operations' paths.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backup::BackupStore;
use crate::config::{AppConfig, Config};
use crate::host::metrics::{Exposition, MetricType};
use crate::ops::log::{EventBody, OpKind, OpLog, OperationRecord};
use crate::probes::{ProbeSpec, TargetPolicy};

/// Upper bounds of `covet_operation_duration_seconds`.
const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// A scrape's health probe: one attempt, at most this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the series are read from.
#[derive(Clone)]
pub struct SeriesSources {
    pub config: Arc<Config>,
    pub oplog: Arc<OpLog>,
    pub backups: BackupStore,
    pub policy: TargetPolicy,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn kind_name(kind: OpKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn state_name(op: &OperationRecord) -> String {
    serde_json::to_value(op.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The series, in the text exposition format.
pub async fn render(s: SeriesSources) -> String {
    let mut prom = Exposition::new();
    let ops = s.oplog.list().unwrap_or_default();
    app_info(&mut prom, &s.config.apps).await;
    health(&mut prom, &s.config.apps, &s.policy).await;
    operations(&mut prom, &ops);
    backups(&mut prom, &s, &ops);
    analysis(&mut prom, &s.oplog, &ops);
    prom.out
}

async fn app_info(prom: &mut Exposition, apps: &[AppConfig]) {
    prom.family(
        "covet_app_info",
        MetricType::Gauge,
        "An app the agent manages, with its installed version (1).",
    );
    for app in apps {
        let version = crate::packages::installed_version(app)
            .await
            .unwrap_or_default();
        prom.sample(
            "covet_app_info",
            &[("app", &app.name), ("version", &version)],
            1u64,
        );
    }
}

async fn health(prom: &mut Exposition, apps: &[AppConfig], policy: &TargetPolicy) {
    let probes = apps.iter().filter_map(|app| {
        let mut spec = app.health.as_ref()?.spec(&app.name, "health").ok()?;
        let attempts = match &mut spec {
            ProbeSpec::Http(h) => &mut h.attempts,
            ProbeSpec::Tcp(t) => &mut t.attempts,
        };
        attempts.retries = 0;
        attempts.timeout = attempts.timeout.min(PROBE_TIMEOUT);
        Some(async move {
            let outcome = crate::probes::probe_declared(policy, &spec).await;
            (
                app.name.as_str(),
                outcome.is_ok_and(|o| o.ok),
                SystemTime::now(),
            )
        })
    });
    let results = futures_util::future::join_all(probes).await;
    prom.family(
        "covet_app_health_up",
        MetricType::Gauge,
        "Whether the app's health probe passed at the last scrape (1) or not (0).",
    );
    for (app, ok, _) in &results {
        prom.sample("covet_app_health_up", &[("app", app)], *ok);
    }
    prom.family(
        "covet_app_health_probe_timestamp_seconds",
        MetricType::Gauge,
        "When the app's health was last probed, in seconds since the epoch.",
    );
    for (app, _, at) in &results {
        prom.sample(
            "covet_app_health_probe_timestamp_seconds",
            &[("app", app)],
            secs(*at),
        );
    }
}

fn operations(prom: &mut Exposition, ops: &[OperationRecord]) {
    let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    // kind -> bucket counts, count, sum
    let mut durations: BTreeMap<String, ([u64; DURATION_BUCKETS.len()], u64, f64)> =
        BTreeMap::new();
    for op in ops.iter().filter(|op| op.state.is_final()) {
        let kind = kind_name(op.kind);
        *counts
            .entry((op.app.clone(), kind.clone(), state_name(op)))
            .or_default() += 1;
        let Some(took) = op.finished.and_then(|f| f.duration_since(op.created).ok()) else {
            continue;
        };
        let took = took.as_secs_f64();
        let entry = durations
            .entry(kind)
            .or_insert(([0; DURATION_BUCKETS.len()], 0, 0.0));
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if took <= *bound {
                entry.0[i] += 1;
            }
        }
        entry.1 += 1;
        entry.2 += took;
    }
    prom.family(
        "covet_operations_total",
        MetricType::Counter,
        "Finished operations by app, kind and outcome.",
    );
    for ((app, kind, outcome), n) in &counts {
        prom.sample(
            "covet_operations_total",
            &[("app", app), ("kind", kind), ("outcome", outcome)],
            *n,
        );
    }
    prom.family(
        "covet_operation_duration_seconds",
        MetricType::Histogram,
        "How long finished operations took, by kind.",
    );
    for (kind, (buckets, count, sum)) in &durations {
        for (bound, n) in DURATION_BUCKETS.iter().zip(buckets) {
            let le = bound.to_string();
            prom.sample(
                "covet_operation_duration_seconds_bucket",
                &[("kind", kind), ("le", &le)],
                *n,
            );
        }
        prom.sample(
            "covet_operation_duration_seconds_bucket",
            &[("kind", kind), ("le", "+Inf")],
            *count,
        );
        prom.sample(
            "covet_operation_duration_seconds_sum",
            &[("kind", kind)],
            *sum,
        );
        prom.sample(
            "covet_operation_duration_seconds_count",
            &[("kind", kind)],
            *count,
        );
    }
}

fn backups(prom: &mut Exposition, s: &SeriesSources, ops: &[OperationRecord]) {
    let names: Vec<&str> = s.config.apps.iter().map(|a| a.name.as_str()).collect();
    let mut last: BTreeMap<String, crate::backup::Manifest> = BTreeMap::new();
    for m in s.backups.list(&names) {
        let newer = last
            .get(&m.app)
            .is_none_or(|old| m.created_unix_ms > old.created_unix_ms);
        if newer {
            last.insert(m.app.clone(), m);
        }
    }
    let families = [
        (
            "covet_backup_last_timestamp_seconds",
            "When the app's newest backup was made, in seconds since the epoch.",
        ),
        (
            "covet_backup_last_size_bytes",
            "Bytes the app's newest backup holds on disk.",
        ),
        (
            "covet_backup_last_duration_seconds",
            "How long making the app's newest backup took.",
        ),
    ];
    for (i, (name, help)) in families.iter().enumerate() {
        prom.family(name, MetricType::Gauge, help);
        for (app, m) in &last {
            let value = match i {
                0 => secs(m.created_time()),
                1 => m.total_bytes as f64,
                _ => match backup_duration(ops, &m.id) {
                    Some(d) => d,
                    None => continue,
                },
            };
            prom.sample(name, &[("app", app)], value);
        }
    }
}

/// How long the backup took: its upgrade's backup step, or its backup operation.
fn backup_duration(ops: &[OperationRecord], id: &str) -> Option<f64> {
    let op = ops.iter().find(|op| op.backup_id == id)?;
    let (start, end) = match op.steps.iter().find(|s| s.name == "backup") {
        Some(step) => (step.started, step.finished?),
        None => (op.created, op.finished?),
    };
    end.duration_since(start).ok().map(|d| d.as_secs_f64())
}

type ReadingValue = fn(&crate::ops::log::AnalysisEvent) -> Option<f64>;

fn analysis(prom: &mut Exposition, oplog: &OpLog, ops: &[OperationRecord]) {
    // The newest upgrade of each app that has analysis readings.
    let mut newest: BTreeMap<&str, &OperationRecord> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.kind == OpKind::Upgrade) {
        if newest
            .get(op.app.as_str())
            .is_none_or(|o| op.created > o.created)
        {
            newest.insert(&op.app, op);
        }
    }
    let mut readings = Vec::new();
    for (app, op) in newest {
        let mut latest: BTreeMap<String, crate::ops::log::AnalysisEvent> = BTreeMap::new();
        for e in oplog.events_from(&op.id, 1).unwrap_or_default() {
            if let EventBody::Analysis(a) = e.body {
                latest.insert(a.rule.clone(), a);
            }
        }
        readings.extend(latest.into_values().map(|a| (app.to_owned(), a)));
    }
    let families: [(&str, &str, ReadingValue); 3] = [
        (
            "covet_analysis_value",
            "An analysis rule's latest value (the newest upgrade's).",
            |a| a.value,
        ),
        (
            "covet_analysis_baseline",
            "An analysis rule's baseline before the newest upgrade.",
            |a| a.baseline,
        ),
        (
            "covet_analysis_limit",
            "An analysis rule's limit in the newest upgrade.",
            |a| a.limit,
        ),
    ];
    for (name, help, value) in families {
        prom.family(name, MetricType::Gauge, help);
        for (app, a) in &readings {
            if let Some(v) = value(a) {
                prom.sample(name, &[("app", app), ("rule", &a.rule)], v);
            }
        }
    }
    prom.family(
        "covet_analysis_state",
        MetricType::Gauge,
        "An analysis rule's latest state (1 for the state it is in: baseline, ok, bad, failed).",
    );
    for (app, a) in &readings {
        let state = a.state.split(' ').next().unwrap_or_default();
        prom.sample(
            "covet_analysis_state",
            &[("app", app), ("rule", &a.rule), ("state", state)],
            1u64,
        );
    }
}
