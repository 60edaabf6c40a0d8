//! Metric analysis: the app's own series (Prometheus text from its
//! `[app.metrics] url`), its PostgreSQL database and its unit's cgroup,
//! judged by the `[[app.analysis]]` rules against a baseline, interval by
//! interval. Knows nothing of upgrades or gRPC: the workflow's preflight
//! takes a [`Baseline`], its watch step feeds snapshots to a [`Judge`].
//!
//! - `exposition.rs` — the strict text-format parser.
//! - `selector.rs` — metric name + label matchers (`=`, `!=`, `=~`, `!~`).
//! - `rule.rs` — typed rules, thresholds, and each rule's value between two
//!   snapshots (increases of counters, `histogram_quantile` of bucket
//!   increases, gauges).

pub mod exposition;
pub mod rule;
pub mod selector;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use exposition::Exposition;
pub use rule::{Kind, PgStat, Rule};

use crate::config::AppConfig;
use crate::db::postgres::PgTarget;
use crate::host::systemd::{ControlledUnit, Systemd};
use crate::probes::TargetPolicy;

/// The largest exposition read from an app.
const MAX_SCRAPE: usize = 8 << 20;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The database's figures at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct PgReading {
    pub connections: f64,
    pub ungranted_locks: f64,
    /// pg_stat_statements' total execution ms and calls, when installed.
    pub statements: Option<(f64, f64)>,
}

/// The unit's cgroup at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitReading {
    pub memory_bytes: u64,
    pub cpu_nsec: Option<u64>,
}

/// Everything the rules read, at one time; a part no rule needs is None, a
/// part that could not be read holds why.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub scrape: Option<Result<Exposition, String>>,
    pub pg: Option<Result<PgReading, String>>,
    pub unit: Option<Result<UnitReading, String>>,
}

/// Where an app's figures come from.
pub struct Sources {
    pub policy: TargetPolicy,
    pub systemd: Arc<Systemd>,
    pub unit: ControlledUnit,
    pub url: Option<String>,
    pub pg: Option<PgTarget>,
}

/// The rules of an app, typed (the configuration was validated, so a rule
/// that does not parse is reported, not skipped).
pub fn rules_of(app: &AppConfig) -> Result<Vec<Rule>, String> {
    app.analysis
        .iter()
        .map(|c| {
            Rule::from_config(c).map_err(|problems| {
                let why: Vec<String> = problems.into_iter().map(|(_, m)| m).collect();
                format!("analysis rule {:?}: {}", c.name, why.join("; "))
            })
        })
        .collect()
}

/// How often an app's rules are judged and how long its baseline is
/// sampled (`[app.metrics]`, or its defaults when only the database or the
/// unit is read).
pub fn timing(app: &AppConfig) -> (Duration, Duration) {
    match &app.metrics {
        Some(m) => (m.interval, m.baseline),
        None => (Duration::from_secs(10), Duration::from_secs(30)),
    }
}

impl Sources {
    /// Where `app`'s rules read from. Finding PostgreSQL's client programs
    /// blocks for up to 10 s, so it is done off the runtime, and only for
    /// rules that read the database.
    pub async fn of(
        app: &AppConfig,
        rules: &[Rule],
        policy: TargetPolicy,
        systemd: Arc<Systemd>,
        unit: ControlledUnit,
    ) -> Result<Sources, String> {
        let pg = match &app.database {
            Some(crate::config::DatabaseConfig::Postgres(d))
                if rules.iter().any(|r| matches!(r.kind, Kind::Postgres(_))) =>
            {
                let bindir = tokio::task::spawn_blocking(PgTarget::discover_bindir)
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Some(PgTarget {
                    dbname: d.dbname.clone(),
                    host: d.host.clone(),
                    port: d.port,
                    user: d.user.clone(),
                    os_user: d.os_user.clone(),
                    bindir,
                })
            }
            _ => None,
        };
        Ok(Sources {
            policy,
            systemd,
            unit,
            url: app.metrics.as_ref().map(|m| m.url.clone()),
            pg,
        })
    }
}

/// The preflight's plan line for the baseline, when the upgrade watches
/// rules.
pub fn baseline_plan(app: &AppConfig, watches: bool) -> Option<String> {
    if !watches || app.analysis.is_empty() {
        return None;
    }
    let (_, window) = timing(app);
    Some(format!(
        "baseline of {} analysis rule(s) sampled over {}",
        app.analysis.len(),
        humantime::format_duration(window)
    ))
}

/// The watch step's plan for the rules.
pub fn watch_plan(app: &AppConfig) -> Option<String> {
    if app.analysis.is_empty() {
        return None;
    }
    let (every, _) = timing(app);
    let names: Vec<&str> = app.analysis.iter().map(|r| r.name.as_str()).collect();
    Some(format!(
        "judge {} analysis rule(s) ({}) every {}",
        names.len(),
        names.join(", "),
        humantime::format_duration(every)
    ))
}

/// PostgreSQL connections and waited-for locks (one psql run).
const PG_ACTIVITY: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid();\n\
     SELECT count(*) FROM pg_locks WHERE NOT granted;\n";
/// Statement totals of the app's database; fails without pg_stat_statements.
const PG_STATEMENTS: &str = "SELECT coalesce(sum(total_exec_time), 0) || '|' || \
     coalesce(sum(calls), 0) FROM pg_stat_statements \
     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database());\n";

impl Sources {
    /// Reads what `rules` need, side by side.
    pub async fn snapshot(&self, rules: &[Rule]) -> Snapshot {
        let scrapes = rules.iter().any(Rule::scrapes);
        let pg_stats: Vec<PgStat> = rules
            .iter()
            .filter_map(|r| match r.kind {
                Kind::Postgres(s) => Some(s),
                _ => None,
            })
            .collect();
        let unit = rules.iter().any(|r| matches!(r.kind, Kind::Unit(_)));
        let (scrape, pg, unit) = tokio::join!(
            async {
                match (&self.url, scrapes) {
                    (Some(url), true) => Some(self.scrape(url).await),
                    (None, true) => Some(Err("no [app.metrics] url is declared".into())),
                    _ => None,
                }
            },
            async {
                if pg_stats.is_empty() {
                    return None;
                }
                Some(self.read_pg(pg_stats.contains(&PgStat::MeanQueryMs)).await)
            },
            async {
                if !unit {
                    return None;
                }
                Some(self.read_unit().await)
            },
        );
        Snapshot {
            at: Instant::now(),
            scrape,
            pg,
            unit,
        }
    }

    async fn scrape(&self, url: &str) -> Result<Exposition, String> {
        scrape(&self.policy, url).await
    }

    async fn read_pg(&self, statements: bool) -> Result<PgReading, String> {
        let Some(t) = &self.pg else {
            return Err("the app declares no PostgreSQL database".into());
        };
        let out = crate::db::postgres::stats_query(t, PG_ACTIVITY, READ_TIMEOUT)
            .await
            .map_err(|e| format!("database statistics: {e}"))?;
        let mut numbers = out.lines().filter_map(|l| l.trim().parse::<f64>().ok());
        let (Some(connections), Some(ungranted_locks)) = (numbers.next(), numbers.next()) else {
            return Err(format!("database statistics: unexpected output {out:?}"));
        };
        let statements = if statements {
            crate::db::postgres::stats_query(t, PG_STATEMENTS, READ_TIMEOUT)
                .await
                .ok()
                .and_then(|out| {
                    let (total, calls) = out.trim().split_once('|')?;
                    Some((total.parse().ok()?, calls.parse().ok()?))
                })
        } else {
            None
        };
        Ok(PgReading {
            connections,
            ungranted_locks,
            statements,
        })
    }

    async fn read_unit(&self) -> Result<UnitReading, String> {
        let s = self
            .systemd
            .status(&self.unit)
            .await
            .map_err(|e| format!("unit {}: {e}", self.unit.as_str()))?;
        if s.memory_bytes == 0 {
            return Err(format!(
                "unit {} reports no memory (is it running, with MemoryAccounting?)",
                self.unit.as_str()
            ));
        }
        Ok(UnitReading {
            memory_bytes: s.memory_bytes,
            cpu_nsec: s.cpu_usage_nsec,
        })
    }
}

/// Reads and parses an app's exposition (within the probes' targets).
pub async fn scrape(policy: &TargetPolicy, url: &str) -> Result<Exposition, String> {
    let (status, body) = crate::probes::http_get(policy, url, READ_TIMEOUT, MAX_SCRAPE)
        .await
        .map_err(|e| format!("cannot read {url}: {e}"))?;
    if status != 200 {
        return Err(format!("{url} answered HTTP {status}"));
    }
    let text = std::str::from_utf8(&body).map_err(|_| format!("{url}: not UTF-8"))?;
    Exposition::parse(text).map_err(|e| format!("{url}: {e}"))
}

/// Each rule's value before the change, in the rules' order (None: no
/// value, e.g. the window saw no requests).
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    pub values: Vec<Option<f64>>,
}

/// Checks that every source answers and every rule finds its series: an
/// unreachable metrics URL, an unknown metric or a `quantile` over a
/// non-histogram is an error naming the rule. Returns the snapshot.
pub async fn check(sources: &Sources, rules: &[Rule]) -> Result<Snapshot, String> {
    let first = sources.snapshot(rules).await;
    for part in [
        first.scrape.as_ref().map(|r| r.as_ref().map(drop)),
        first.pg.as_ref().map(|r| r.as_ref().map(drop)),
        first.unit.as_ref().map(|r| r.as_ref().map(drop)),
    ]
    .into_iter()
    .flatten()
    {
        part.map_err(Clone::clone)?;
    }
    if let Some(Ok(e)) = &first.scrape {
        for rule in rules {
            rule.check_against(e)
                .map_err(|why| format!("analysis rule {:?}: {why}", rule.name))?;
        }
    }
    Ok(first)
}

/// Samples the baseline: a snapshot now and one `window` later, each rule's
/// value over that span. `canceled` is polled while waiting.
pub async fn baseline(
    sources: &Sources,
    rules: &[Rule],
    window: Duration,
    canceled: &(dyn Fn() -> bool + Sync),
) -> Result<Baseline, String> {
    let first = check(sources, rules).await?;
    let until = Instant::now() + window;
    while Instant::now() < until {
        if canceled() {
            return Err("canceled".into());
        }
        tokio::time::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250)),
        )
        .await;
    }
    let last = sources.snapshot(rules).await;
    let mut values = Vec::new();
    for rule in rules {
        let v = rule
            .value(&first, &last)
            .map_err(|why| format!("analysis rule {:?}: no baseline: {why}", rule.name))?;
        values.push(Some(v));
    }
    Ok(Baseline { values })
}

/// A rule's baseline, as a reading.
pub fn baseline_reading(rule: &Rule, value: Option<f64>) -> Reading {
    Reading {
        rule: rule.name.clone(),
        description: rule.describe(),
        baseline: None,
        value,
        limit: rule.threshold.limit(value),
        state: State::Baseline,
        missing: String::new(),
        failures: rule.failures,
    }
}

/// Evaluates `rules` now, without a baseline: two snapshots `interval`
/// apart. Err when a source does not answer or a rule finds no series.
pub async fn now(
    sources: &Sources,
    rules: Vec<Rule>,
    interval: Duration,
) -> Result<Vec<Reading>, String> {
    let first = check(sources, &rules).await?;
    tokio::time::sleep(interval).await;
    let second = sources.snapshot(&rules).await;
    Ok(Judge::new(rules, &Baseline::default()).observe(&first, &second))
}

/// How a rule stands after an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The value before the change.
    Baseline,
    Ok,
    /// Bad for this many consecutive intervals, fewer than the rule allows.
    Bad(u32),
    Failed,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Baseline => f.write_str("baseline"),
            State::Ok => f.write_str("ok"),
            State::Bad(n) => write!(f, "bad {n}"),
            State::Failed => f.write_str("failed"),
        }
    }
}

/// One rule's reading for one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub rule: String,
    /// What the rule measures and its threshold.
    pub description: String,
    pub baseline: Option<f64>,
    /// None when a metric is missing (see `missing`).
    pub value: Option<f64>,
    pub limit: Option<f64>,
    pub state: State,
    /// Why there is no value.
    pub missing: String,
    /// Consecutive bad intervals that fail the rule.
    pub failures: u32,
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.6}"))
}

impl Reading {
    /// Why the rule failed, for the operation's cause.
    pub fn cause(&self) -> String {
        let value = match self.value {
            Some(v) => format!("value {v:.6}"),
            None => format!("no value ({})", self.missing),
        };
        format!(
            "analysis rule {:?} failed: {value}, baseline {}, limit {}, bad for {} consecutive interval(s)",
            self.rule,
            num(self.baseline),
            num(self.limit),
            self.failures
        )
    }
}

/// Judges rules interval by interval against a baseline.
pub struct Judge {
    rules: Vec<Rule>,
    baseline: Vec<Option<f64>>,
    bad: Vec<u32>,
}

impl Judge {
    pub fn new(rules: Vec<Rule>, baseline: &Baseline) -> Judge {
        let n = rules.len();
        let mut values = baseline.values.clone();
        values.resize(n, None);
        Judge {
            rules,
            baseline: values,
            bad: vec![0; n],
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Judges the interval from `prev` to `cur`: a value over the limit or a
    /// missing metric is a bad interval; `failures` in a row fail the rule.
    pub fn observe(&mut self, prev: &Snapshot, cur: &Snapshot) -> Vec<Reading> {
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let baseline = self.baseline[i];
            let limit = rule.threshold.limit(baseline);
            let (value, missing) = match rule.value(prev, cur) {
                Ok(v) => (Some(v), String::new()),
                Err(why) => (None, why),
            };
            let bad = match (value, limit) {
                (None, _) => true,
                (Some(v), Some(limit)) => v > limit,
                (Some(_), None) => false,
            };
            self.bad[i] = if bad { self.bad[i] + 1 } else { 0 };
            let state = match self.bad[i] {
                0 => State::Ok,
                n if n >= rule.failures => State::Failed,
                n => State::Bad(n),
            };
            out.push(Reading {
                rule: rule.name.clone(),
                description: rule.describe(),
                baseline,
                value,
                limit,
                state,
                missing,
                failures: rule.failures,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(requests: f64, errors: f64) -> Snapshot {
        let text = format!(
            "http_requests_total{{code=\"200\"}} {requests}\nhttp_requests_total{{code=\"500\"}} {errors}\n"
        );
        Snapshot {
            at: Instant::now(),
            scrape: Some(Exposition::parse(&text).map_err(|e| e.to_string())),
            pg: None,
            unit: None,
        }
    }

    fn judge(max_increase: &str, failures: u32, baseline: f64) -> Judge {
        let c: crate::config::AnalysisConfig = toml::from_str(&format!(
            r#"name = "errors"
            ratio = {{ num = 'http_requests_total{{code=~"5.."}}', den = "http_requests_total" }}
            max_increase = "{max_increase}"
            failures = {failures}"#
        ))
        .unwrap();
        let rule = Rule::from_config(&c).unwrap();
        Judge::new(
            vec![rule],
            &Baseline {
                values: vec![Some(baseline)],
            },
        )
    }

    #[test]
    fn consecutive_bad_intervals_fail_a_rule_and_a_good_one_resets() {
        let mut j = judge("100%", 2, 0.05);
        let s = [
            snap(0.0, 0.0),
            snap(90.0, 10.0),  // 0.1: at the limit, not over
            snap(170.0, 30.0), // 0.2: bad 1
            snap(260.0, 40.0), // 0.1: ok again
            snap(340.0, 60.0), // bad 1
            snap(420.0, 80.0), // bad 2: failed
        ];
        let states: Vec<State> = s
            .windows(2)
            .map(|w| j.observe(&w[0], &w[1])[0].state)
            .collect();
        assert_eq!(
            states,
            [
                State::Ok,
                State::Bad(1),
                State::Ok,
                State::Bad(1),
                State::Failed
            ]
        );
        let last = j.observe(&s[4], &s[5]);
        let cause = last[0].cause();
        assert!(
            cause.contains("\"errors\"") && cause.contains("0.200000"),
            "{cause}"
        );
        assert!(
            cause.contains("baseline 0.050000") && cause.contains("limit 0.100000"),
            "{cause}"
        );
        assert_eq!(
            last[0].description,
            "increase(http_requests_total{code=~\"5..\"}) / increase(http_requests_total), max_increase 100%"
        );
    }

    #[test]
    fn the_plan_says_when_the_baseline_is_sampled_and_what_the_watch_judges() {
        let app: AppConfig = toml::from_str(
            r#"
            name = "covet"
            unit = "covet.service"
            [metrics]
            url = "http://127.0.0.1:8000/metrics"
            interval = "5s"
            baseline = "20s"
            [[analysis]]
            name = "errors"
            ratio = { num = 'r{code=~"5.."}', den = "r" }
            max = 0.01
            [[analysis]]
            name = "memory"
            unit = "memory_bytes"
            max_increase = "100%"
            "#,
        )
        .unwrap();
        assert_eq!(
            baseline_plan(&app, true).unwrap(),
            "baseline of 2 analysis rule(s) sampled over 20s"
        );
        assert_eq!(baseline_plan(&app, false), None, "no watch, no baseline");
        assert_eq!(
            watch_plan(&app).unwrap(),
            "judge 2 analysis rule(s) (errors, memory) every 5s"
        );
        assert_eq!(rules_of(&app).unwrap().len(), 2);
    }

    #[test]
    fn a_missing_metric_is_a_bad_interval() {
        let mut j = judge("50%", 1, 0.0);
        let gone = Snapshot {
            at: Instant::now(),
            scrape: Some(Err("cannot read http://127.0.0.1:1/metrics".into())),
            pg: None,
            unit: None,
        };
        let r = &j.observe(&snap(1.0, 0.0), &gone)[0];
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.value, None);
        assert!(r.cause().contains("cannot read"), "{}", r.cause());
    }
}
