//! Analysis rules, typed from `[[app.analysis]]`, and what each measures
//! between two snapshots.

use std::collections::BTreeMap;
use std::time::Duration;

use super::exposition::{Exposition, MetricType};
use super::selector::Selector;
use super::{PgReading, Snapshot, UnitReading};
use crate::config::AnalysisConfig;

/// The database statistics a rule may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PgStat {
    /// Sessions on the app's database (`pg_stat_activity`).
    Connections,
    /// Locks waited for (`pg_locks` not granted).
    UngrantedLocks,
    /// Mean execution time of the statements run in the interval
    /// (`pg_stat_statements`, which must be installed).
    MeanQueryMs,
}

impl PgStat {
    pub const NAMES: [(&'static str, PgStat); 3] = [
        ("connections", PgStat::Connections),
        ("ungranted_locks", PgStat::UngrantedLocks),
        ("mean_query_ms", PgStat::MeanQueryMs),
    ];
}

/// The unit's cgroup figures a rule may read (from systemd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitStat {
    MemoryBytes,
    CpuPercent,
}

impl UnitStat {
    pub const NAMES: [(&'static str, UnitStat); 2] = [
        ("memory_bytes", UnitStat::MemoryBytes),
        ("cpu_percent", UnitStat::CpuPercent),
    ];
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// Increase of `num` over increase of `den` (0 when `den` did not grow).
    Ratio {
        num: Selector,
        den: Selector,
    },
    /// The `q` quantile of a histogram's observations in the interval.
    Quantile {
        histogram: Selector,
        q: f64,
    },
    Postgres(PgStat),
    Unit(UnitStat),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// The value may not exceed this.
    Max(f64),
    /// The value may not exceed the baseline by more than this fraction.
    MaxIncrease(f64),
}

impl Threshold {
    /// The limit, given the baseline (a `max_increase` without one has none).
    pub fn limit(self, baseline: Option<f64>) -> Option<f64> {
        match self {
            Threshold::Max(max) => Some(max),
            Threshold::MaxIncrease(f) => baseline.map(|b| b * (1.0 + f)),
        }
    }

    pub fn describe(self) -> String {
        match self {
            Threshold::Max(max) => format!("max {max}"),
            Threshold::MaxIncrease(f) => format!("max_increase {}%", f * 100.0),
        }
    }
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub kind: Kind,
    pub threshold: Threshold,
    /// Consecutive bad intervals that fail the rule.
    pub failures: u32,
}

/// A problem with a rule's configuration: the field (under the rule's key)
/// and what is wrong.
pub type RuleProblem = (&'static str, String);

impl Rule {
    /// The rule a `[[app.analysis]]` entry declares, or every problem with it.
    pub fn from_config(c: &AnalysisConfig) -> Result<Rule, Vec<RuleProblem>> {
        let mut problems: Vec<RuleProblem> = Vec::new();
        if c.name.trim().is_empty() {
            problems.push(("name", "must not be empty".into()));
        }
        let mut kinds = Vec::new();
        if let Some(r) = &c.ratio {
            let num = Selector::parse(&r.num).map_err(|e| problems.push(("ratio.num", e)));
            let den = Selector::parse(&r.den).map_err(|e| problems.push(("ratio.den", e)));
            if let (Ok(num), Ok(den)) = (num, den) {
                kinds.push(Kind::Ratio { num, den });
            }
        }
        if let Some(q) = &c.quantile {
            if !(q.q > 0.0 && q.q < 1.0) {
                problems.push(("quantile.q", format!("{} is not between 0 and 1", q.q)));
            }
            match Selector::parse(&q.histogram) {
                Ok(histogram) if !histogram.matchers.iter().any(|m| m.label == "le") => {
                    kinds.push(Kind::Quantile { histogram, q: q.q })
                }
                Ok(_) => problems.push((
                    "quantile.histogram",
                    "name the histogram without an `le` matcher".into(),
                )),
                Err(e) => problems.push(("quantile.histogram", e)),
            }
        }
        if let Some(name) = &c.postgres {
            match PgStat::NAMES.iter().find(|(n, _)| n == name) {
                Some((_, stat)) => kinds.push(Kind::Postgres(*stat)),
                None => problems.push((
                    "postgres",
                    format!(
                        "{name:?} is not one of \"connections\", \"ungranted_locks\", \"mean_query_ms\""
                    ),
                )),
            }
        }
        if let Some(name) = &c.unit {
            match UnitStat::NAMES.iter().find(|(n, _)| n == name) {
                Some((_, stat)) => kinds.push(Kind::Unit(*stat)),
                None => problems.push((
                    "unit",
                    format!("{name:?} is not one of \"memory_bytes\", \"cpu_percent\""),
                )),
            }
        }
        let declared = [
            c.ratio.is_some(),
            c.quantile.is_some(),
            c.postgres.is_some(),
            c.unit.is_some(),
        ];
        match declared.iter().filter(|d| **d).count() {
            0 => problems.push((
                "",
                "declares no rule: give one of ratio, quantile, postgres or unit".into(),
            )),
            1 => {}
            _ => problems.push((
                "",
                "declares more than one rule kind (ratio, quantile, postgres, unit): one per [[app.analysis]]".into(),
            )),
        }
        let threshold = match (c.max, &c.max_increase) {
            (Some(max), None) if max.is_finite() => Some(Threshold::Max(max)),
            (Some(max), None) => {
                problems.push(("max", format!("{max} is not a finite number")));
                None
            }
            (None, Some(text)) => match parse_percent(text) {
                Ok(f) => Some(Threshold::MaxIncrease(f)),
                Err(e) => {
                    problems.push(("max_increase", e));
                    None
                }
            },
            (None, None) => {
                problems.push((
                    "",
                    "has no threshold: give max (absolute) or max_increase (\"50%\", against the baseline)".into(),
                ));
                None
            }
            (Some(_), Some(_)) => {
                problems.push(("max_increase", "give max or max_increase, not both".into()));
                None
            }
        };
        if c.failures == 0 {
            problems.push(("failures", "must be at least 1".into()));
        }
        match (kinds.pop(), threshold) {
            (Some(kind), Some(threshold)) if problems.is_empty() => Ok(Rule {
                name: c.name.clone(),
                kind,
                threshold,
                failures: c.failures,
            }),
            _ => Err(problems),
        }
    }

    /// Whether the rule reads the app's metrics endpoint.
    pub fn scrapes(&self) -> bool {
        matches!(self.kind, Kind::Ratio { .. } | Kind::Quantile { .. })
    }

    /// What the rule measures, for plans and tables.
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            Kind::Ratio { num, den } => format!("increase({num}) / increase({den})"),
            Kind::Quantile { histogram, q } => format!("p{} of {histogram}", q * 100.0),
            Kind::Postgres(stat) => format!("postgres {}", name_of(&PgStat::NAMES, stat)),
            Kind::Unit(stat) => format!("unit {}", name_of(&UnitStat::NAMES, stat)),
        };
        format!("{what}, {}", self.threshold.describe())
    }

    /// Problems that only a scrape shows: a selected metric the app does not
    /// export, a `quantile` over something that is not a histogram.
    pub fn check_against(&self, e: &Exposition) -> Result<(), String> {
        match &self.kind {
            Kind::Ratio { num, den } => {
                for s in [num, den] {
                    if !e.has(&s.name) {
                        return Err(format!("the app does not export {}", s.name));
                    }
                }
                Ok(())
            }
            Kind::Quantile { histogram, .. } => {
                let name = &histogram.name;
                match e.type_of(name) {
                    Some(MetricType::Histogram) => {}
                    Some(other) => {
                        return Err(format!("{name} is a {other:?}, not a histogram"));
                    }
                    None if e.has(name) => return Err(format!("{name} is not a histogram")),
                    None => {}
                }
                if e.has(&format!("{name}_bucket")) {
                    Ok(())
                } else {
                    Err(format!("the app does not export {name}_bucket"))
                }
            }
            Kind::Postgres(_) | Kind::Unit(_) => Ok(()),
        }
    }

    /// [`Rule::check_against`] by field: `ratio.num`, `ratio.den`,
    /// `quantile.histogram`.
    pub fn problems_against(&self, e: &Exposition) -> Vec<(&'static str, String)> {
        match &self.kind {
            Kind::Ratio { num, den } => [("ratio.num", num), ("ratio.den", den)]
                .into_iter()
                .filter(|(_, s)| !e.has(&s.name))
                .map(|(field, s)| (field, format!("the app does not export {}", s.name)))
                .collect(),
            Kind::Quantile { .. } => match self.check_against(e) {
                Ok(()) => Vec::new(),
                Err(why) => vec![("quantile.histogram", why)],
            },
            Kind::Postgres(_) | Kind::Unit(_) => Vec::new(),
        }
    }

    /// The rule's value over the interval from `prev` to `cur`; Err says
    /// what is missing (a missing metric counts as a bad interval).
    pub fn value(&self, prev: &Snapshot, cur: &Snapshot) -> Result<f64, String> {
        match &self.kind {
            Kind::Ratio { num, den } => {
                let (p, c) = (scrape(prev)?, scrape(cur)?);
                self.check_against(c)?;
                let den = increase(den, "", p, c);
                Ok(if den > 0.0 {
                    increase(num, "", p, c) / den
                } else {
                    0.0
                })
            }
            Kind::Quantile { histogram, q } => {
                let (p, c) = (scrape(prev)?, scrape(cur)?);
                self.check_against(c)?;
                Ok(quantile(*q, &bucket_increases(histogram, p, c)))
            }
            Kind::Postgres(stat) => {
                let c = pg(cur)?;
                Ok(match stat {
                    PgStat::Connections => c.connections,
                    PgStat::UngrantedLocks => c.ungranted_locks,
                    PgStat::MeanQueryMs => {
                        let p = pg(prev)?;
                        let (total, calls) = match (c.statements, p.statements) {
                            (Some(c), Some(p)) => (c.0 - p.0, c.1 - p.1),
                            _ => return Err("pg_stat_statements is not installed".into()),
                        };
                        if calls > 0.0 { total / calls } else { 0.0 }
                    }
                })
            }
            Kind::Unit(UnitStat::MemoryBytes) => Ok(unit(cur)?.memory_bytes as f64),
            Kind::Unit(UnitStat::CpuPercent) => {
                let (p, c) = (unit(prev)?, unit(cur)?);
                let (Some(pc), Some(cc)) = (p.cpu_nsec, c.cpu_nsec) else {
                    return Err("CPU accounting is off for the unit".into());
                };
                let wall = cur.at.saturating_duration_since(prev.at);
                if wall < Duration::from_millis(1) {
                    return Err("no time between the samples".into());
                }
                Ok(cc.saturating_sub(pc) as f64 / wall.as_nanos() as f64 * 100.0)
            }
        }
    }
}

fn name_of<T: PartialEq>(names: &[(&'static str, T)], value: &T) -> &'static str {
    names
        .iter()
        .find(|(_, v)| v == value)
        .map_or("?", |(n, _)| n)
}

fn scrape(s: &Snapshot) -> Result<&Exposition, String> {
    match &s.scrape {
        Some(Ok(e)) => Ok(e),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the metrics endpoint was not read".into()),
    }
}

fn pg(s: &Snapshot) -> Result<&PgReading, String> {
    match &s.pg {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the database was not read".into()),
    }
}

fn unit(s: &Snapshot) -> Result<&UnitReading, String> {
    match &s.unit {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(e.clone()),
        None => Err("the unit was not read".into()),
    }
}

/// `"50%"` (or `"0.5"`) as a fraction.
fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let f = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a percentage like \"50%\""))?;
    if f.is_finite() && f >= 0.0 {
        Ok(f)
    } else {
        Err(format!("{text:?} must be a positive percentage"))
    }
}

/// The sum of the counters' increases over the series `sel` selects (the
/// name with `suffix`), a series that dropped counting as reset to 0.
fn increase(sel: &Selector, suffix: &str, prev: &Exposition, cur: &Exposition) -> f64 {
    let name = format!("{}{suffix}", sel.name);
    let before: BTreeMap<&BTreeMap<String, String>, f64> = prev
        .samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (&s.labels, s.value))
        .collect();
    cur.samples
        .iter()
        .filter(|s| s.name == name && sel.matches_labels(&s.labels))
        .map(|s| counter_increase(before.get(&s.labels).copied(), s.value))
        // An empty sum of floats is -0.0: shown as "-0", it reads as odd.
        .fold(0.0, |a, b| a + b)
}

fn counter_increase(before: Option<f64>, now: f64) -> f64 {
    match before {
        Some(b) if now >= b => now - b,
        // New since the last scrape, or reset (the app restarted).
        _ => now,
    }
}

/// The histogram's bucket increases by upper bound, summed over the
/// selected series, cumulative and ascending.
fn bucket_increases(sel: &Selector, prev: &Exposition, cur: &Exposition) -> Vec<(f64, f64)> {
    let name = format!("{}_bucket", sel.name);
    let before: BTreeMap<&BTreeMap<String, String>, f64> = prev
        .samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (&s.labels, s.value))
        .collect();
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for s in cur
        .samples
        .iter()
        .filter(|s| s.name == name && sel.matches_labels(&s.labels))
    {
        let Some(le) = s.labels.get("le").and_then(|le| parse_le(le)) else {
            continue;
        };
        let inc = counter_increase(before.get(&s.labels).copied(), s.value);
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(entry) => entry.1 += inc,
            None => by_le.push((le, inc)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Resets at different times can break monotonicity: keep it, as Prometheus does.
    let mut max = 0.0f64;
    for entry in &mut by_le {
        max = max.max(entry.1);
        entry.1 = max;
    }
    by_le
}

fn parse_le(le: &str) -> Option<f64> {
    match le {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

/// `histogram_quantile` over cumulative buckets: linear interpolation inside
/// the bucket that holds the rank; the highest finite bound when the rank is
/// in the `+Inf` bucket; 0 with no observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (i, &(le, count)) in buckets.iter().enumerate() {
        if count >= rank {
            if le.is_infinite() {
                return if i > 0 { buckets[i - 1].0 } else { 0.0 };
            }
            if i == 0 && le <= 0.0 {
                return le;
            }
            let (start, below) = lower;
            if count == below {
                return le;
            }
            return start + (le - start) * (rank - below) / (count - below);
        }
        lower = (le, count);
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AnalysisConfig;
    use std::time::Instant;

    fn rule(toml_text: &str) -> Result<Rule, Vec<RuleProblem>> {
        let c: AnalysisConfig = toml::from_str(toml_text).unwrap();
        Rule::from_config(&c)
    }

    fn fields(toml_text: &str) -> Vec<&'static str> {
        rule(toml_text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.0)
            .collect()
    }

    #[test]
    fn rules_parse_from_config() {
        let r = rule(
            r#"name = "error rate"
            ratio = { num = 'http_requests_total{code=~"5.."}', den = "http_requests_total" }
            max = 0.01"#,
        )
        .unwrap();
        assert!(matches!(r.kind, Kind::Ratio { .. }));
        assert_eq!(r.threshold, Threshold::Max(0.01));
        assert_eq!(r.failures, 2);
        let r = rule(
            r#"name = "p99"
            quantile = { histogram = "http_request_duration_seconds", q = 0.99 }
            max_increase = "50%"
            failures = 3"#,
        )
        .unwrap();
        assert_eq!(r.threshold, Threshold::MaxIncrease(0.5));
        assert_eq!(r.failures, 3);
        assert_eq!(r.threshold.limit(Some(2.0)), Some(3.0));
        assert_eq!(r.threshold.limit(None), None);
        let r = rule("name = \"c\"\npostgres = \"connections\"\nmax = 80").unwrap();
        assert!(matches!(r.kind, Kind::Postgres(PgStat::Connections)));
        let r = rule("name = \"m\"\nunit = \"memory_bytes\"\nmax_increase = \"100%\"").unwrap();
        assert!(matches!(r.kind, Kind::Unit(UnitStat::MemoryBytes)));
    }

    #[test]
    fn bad_rules_name_the_field() {
        assert_eq!(fields("name = \"x\"\nmax = 1"), [""]);
        assert_eq!(fields("name = \"x\"\npostgres = \"connections\""), [""]);
        assert_eq!(
            fields("name = \"x\"\npostgres = \"rows\"\nmax = 1"),
            ["postgres"]
        );
        assert_eq!(fields("name = \"x\"\nunit = \"disk\"\nmax = 1"), ["unit"]);
        assert_eq!(
            fields("name = \"x\"\nunit = \"cpu_percent\"\nmax_increase = \"lots\""),
            ["max_increase"]
        );
        assert_eq!(
            fields("name = \"x\"\nunit = \"cpu_percent\"\nmax = 1\nmax_increase = \"5%\""),
            ["max_increase"]
        );
        assert_eq!(
            fields("name = \"x\"\nratio = { num = \"a{b\", den = \"c\" }\nmax = 1"),
            ["ratio.num"]
        );
        assert_eq!(
            fields("name = \"x\"\nquantile = { histogram = \"h\", q = 1.5 }\nmax = 1"),
            ["quantile.q"]
        );
        assert_eq!(
            fields("name = \"x\"\nquantile = { histogram = 'h{le=\"1\"}', q = 0.5 }\nmax = 1"),
            ["quantile.histogram"]
        );
        assert_eq!(
            fields("name = \"x\"\nunit = \"cpu_percent\"\npostgres = \"connections\"\nmax = 1"),
            [""]
        );
        assert_eq!(
            fields("name = \"x\"\nunit = \"cpu_percent\"\nmax = 1\nfailures = 0"),
            ["failures"]
        );
        // An unknown rule kind is refused by the parse, naming it.
        let e = toml::from_str::<AnalysisConfig>("name = \"x\"\ngauge = \"y\"\nmax = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gauge"), "{e}");
    }

    fn snap(text: &str) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            scrape: Some(Exposition::parse(text).map_err(|e| e.to_string())),
            pg: None,
            unit: None,
        }
    }

    const BEFORE: &str = r#"
# TYPE http_requests_total counter
http_requests_total{code="200"} 100
http_requests_total{code="500"} 1
# TYPE lat histogram
lat_bucket{le="0.01"} 90
lat_bucket{le="0.1"} 99
lat_bucket{le="1"} 100
lat_bucket{le="+Inf"} 100
lat_sum 2
lat_count 100
# TYPE g gauge
g 1
"#;

    #[test]
    fn ratio_of_increases_counts_new_series_and_resets() {
        let r = rule(
            r#"name = "e"
            ratio = { num = 'http_requests_total{code=~"5.."}', den = "http_requests_total" }
            max = 0.01"#,
        )
        .unwrap();
        let before = snap(BEFORE);
        let after = snap(
            "http_requests_total{code=\"200\"} 190\nhttp_requests_total{code=\"500\"} 11\n\
             http_requests_total{code=\"503\"} 0\n",
        );
        assert!((r.value(&before, &after).unwrap() - 0.1).abs() < 1e-9);
        // Restarted: counters start again from 0.
        let reset =
            snap("http_requests_total{code=\"200\"} 18\nhttp_requests_total{code=\"502\"} 2\n");
        assert!((r.value(&before, &reset).unwrap() - 0.1).abs() < 1e-9);
        // No traffic: 0 (not -0), not a division by zero.
        let idle = r.value(&before, &before).unwrap();
        assert!(idle == 0.0 && idle.is_sign_positive());
        let no_errors = snap("http_requests_total{code=\"200\"} 150\n");
        assert!(r.value(&before, &no_errors).unwrap().is_sign_positive());
        // The app stopped exporting the metric: missing, a bad interval.
        let gone = snap("g 1\n");
        assert!(
            r.value(&before, &gone)
                .unwrap_err()
                .contains("http_requests_total")
        );
    }

    #[test]
    fn quantile_interpolates_in_the_bucket_of_the_rank() {
        let b = [
            (0.01, 90.0),
            (0.1, 99.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b) - 0.01 * 50.0 / 90.0).abs() < 1e-12);
        assert!((quantile(0.99, &b) - 0.1).abs() < 1e-12);
        assert!((quantile(0.995, &b) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), 0.0);
        assert_eq!(quantile(0.99, &[(0.1, 1.0), (f64::INFINITY, 10.0)]), 0.1);
        assert_eq!(quantile(0.5, &[]), 0.0);

        let r = rule(
            "name = \"p\"\nquantile = { histogram = \"lat\", q = 0.5 }\nmax_increase = \"50%\"",
        )
        .unwrap();
        let before = snap(BEFORE);
        // 10 more observations, all between 0.1 and 1.
        let after = snap(
            "# TYPE lat histogram\nlat_bucket{le=\"0.01\"} 90\nlat_bucket{le=\"0.1\"} 99\n\
             lat_bucket{le=\"1\"} 110\nlat_bucket{le=\"+Inf\"} 110\nlat_count 110\n",
        );
        assert!((r.value(&before, &after).unwrap() - 0.55).abs() < 1e-9);
        let not_histogram =
            rule("name = \"p\"\nquantile = { histogram = \"g\", q = 0.5 }\nmax = 1").unwrap();
        let e = not_histogram.check_against(before.scrape.as_ref().unwrap().as_ref().unwrap());
        assert!(e.unwrap_err().contains("not a histogram"));
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("50%"), Ok(0.5));
        assert_eq!(parse_percent(" 100 %"), Ok(1.0));
        assert_eq!(parse_percent("0.25"), Ok(0.25));
        assert!(parse_percent("-5%").is_err());
        assert!(parse_percent("five").is_err());
    }
}
