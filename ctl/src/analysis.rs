//! Metric analysis in covetctl: `covetctl analysis APP` (the rules judged
//! now), the live table `upgrade --watch` draws on a terminal (plain lines
//! otherwise), and the readings' JSON.

use std::process::ExitCode;
use std::time::Duration;

use covet_proto::v1 as pb;
use serde_json::json;

use crate::output;
use crate::target::connect_node;
use crate::{Global, Output};

fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-3) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
        None => "-".into(),
    }
}

fn now(r: &pb::AnalysisReading) -> String {
    match r.value {
        Some(_) => num(r.value),
        None => format!("missing ({})", r.missing),
    }
}

/// One reading as a plain line.
pub fn line(r: &pb::AnalysisReading) -> String {
    format!(
        "analysis {:?}: now {} baseline {} limit {} state {}",
        r.rule,
        now(r),
        num(r.baseline),
        num(r.limit),
        r.state
    )
}

pub fn reading_json(r: &pb::AnalysisReading) -> serde_json::Value {
    json!({
        "rule": r.rule,
        "description": r.description,
        "step": r.step,
        "baseline": r.baseline,
        "value": r.value,
        "limit": r.limit,
        "state": r.state,
        "missing": r.missing,
        "failures": r.failures,
    })
}

const HEADER: [&str; 5] = ["RULE", "BASELINE", "NOW", "LIMIT", "STATE"];

fn row(r: &pb::AnalysisReading) -> Vec<String> {
    vec![
        r.rule.clone(),
        num(r.baseline),
        now(r),
        num(r.limit),
        r.state.clone(),
    ]
}

/// The live table of `upgrade --watch` on a terminal: the latest reading
/// of each rule, redrawn in place while nothing else was printed below it.
#[derive(Default)]
pub struct LiveTable {
    latest: Vec<pb::AnalysisReading>,
    /// Lines the last drawing took, 0 when other output followed it.
    drawn: usize,
}

impl LiveTable {
    /// Takes a reading; returns the text to print (with the escapes that
    /// move back over the previous drawing).
    pub fn update(&mut self, r: &pb::AnalysisReading) -> String {
        match self.latest.iter_mut().find(|x| x.rule == r.rule) {
            Some(x) => *x = r.clone(),
            None => self.latest.push(r.clone()),
        }
        let rows: Vec<Vec<String>> = self.latest.iter().map(row).collect();
        let text = output::table_text(&HEADER, &rows);
        let back = match self.drawn {
            0 => String::new(),
            n => format!("\x1b[{n}A\x1b[J"),
        };
        self.drawn = text.lines().count();
        format!("{back}{}", text.trim_end_matches('\n'))
    }

    /// Something else was printed: the next drawing starts below it.
    pub fn interrupted(&mut self) {
        self.drawn = 0;
    }
}

/// `covetctl analysis APP`: the rules judged now, over one interval.
pub async fn analysis(
    g: &Global,
    app: String,
    interval: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let node = connect_node(g).await?;
    let mut client = pb::probe_service_client::ProbeServiceClient::new(node.channel.clone());
    let interval = interval.and_then(|d| prost_types::Duration::try_from(d).ok());
    let r = client
        .analyze_app(pb::AnalyzeAppRequest { app, interval })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    let failing = r.readings.iter().any(|x| x.state != "ok");
    if g.output == Output::Json {
        output::json(&json!({
            "endpoint": node.endpoint,
            "app": r.app,
            "readings": r.readings.iter().map(reading_json).collect::<Vec<_>>(),
        }));
    } else {
        let rows: Vec<Vec<String>> = r
            .readings
            .iter()
            .map(|x| {
                let mut cells = row(x);
                cells.remove(1); // no baseline outside an upgrade
                cells.push(x.description.clone());
                cells
            })
            .collect();
        output::table(&["RULE", "NOW", "LIMIT", "STATE", "WHAT"], &rows);
    }
    Ok(if failing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(rule: &str, value: Option<f64>, state: &str) -> pb::AnalysisReading {
        pb::AnalysisReading {
            rule: rule.into(),
            baseline: Some(0.004),
            value,
            limit: Some(0.04),
            state: state.into(),
            missing: "cannot read http://127.0.0.1:1/metrics".into(),
            ..Default::default()
        }
    }

    #[test]
    fn lines_and_the_live_table() {
        assert_eq!(
            line(&reading("p99", Some(0.2), "bad 1")),
            "analysis \"p99\": now 0.2000 baseline 0.0040 limit 0.0400 state bad 1"
        );
        assert!(line(&reading("p99", None, "failed")).contains("now missing (cannot read"));
        let mut t = LiveTable::default();
        let first = t.update(&reading("p99", Some(0.01), "ok"));
        assert!(
            first.starts_with("RULE") && first.contains("p99"),
            "{first}"
        );
        let second = t.update(&reading("errors", Some(0.0), "ok"));
        assert!(second.starts_with("\x1b[2A\x1b[J"), "{second:?}");
        assert_eq!(second.lines().count(), 3, "{second}");
        let third = t.update(&reading("p99", Some(0.3), "bad 1"));
        assert!(
            third.starts_with("\x1b[3A\x1b[J") && third.contains("bad 1"),
            "{third:?}"
        );
        assert_eq!(third.lines().count(), 3, "one row per rule: {third}");
        t.interrupted();
        assert!(
            t.update(&reading("p99", Some(0.3), "failed"))
                .starts_with("RULE")
        );
    }
}
