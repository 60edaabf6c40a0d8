//! A strict parser of the Prometheus text exposition format (version
//! 0.0.4): `# HELP`, `# TYPE`, samples with labels, `+Inf`/`-Inf`/`NaN`,
//! optional timestamps (ignored). A malformed line is an error naming its
//! line number, never skipped: a half-read scrape would judge a release on
//! part of its series.
//!
//! (The `prometheus-parse` crate was considered: it is unmaintained since
//! 2023, skips lines it cannot read and pulls in chrono; this is 200 lines
//! with tests on literal exposition text.)

use std::collections::BTreeMap;

/// A metric family's declared type (`# TYPE name TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One scrape, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Declared types by family name.
    pub types: BTreeMap<String, MetricType>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl Exposition {
    /// Parses exposition text.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut out = Exposition::default();
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| ParseError {
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                out.comment(comment).map_err(err)?;
                continue;
            }
            out.samples.push(parse_sample(line).map_err(err)?);
        }
        Ok(out)
    }

    fn comment(&mut self, comment: &str) -> Result<(), String> {
        let mut words = comment.split_whitespace();
        if words.next() != Some("TYPE") {
            return Ok(()); // HELP and free comments
        }
        let (Some(name), Some(kind), None) = (words.next(), words.next(), words.next()) else {
            return Err("expected `# TYPE NAME TYPE`".into());
        };
        check_metric_name(name)?;
        let kind = match kind {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "summary" => MetricType::Summary,
            "untyped" => MetricType::Untyped,
            other => return Err(format!("unknown metric type {other:?}")),
        };
        if self.types.insert(name.to_owned(), kind).is_some() {
            return Err(format!("a second TYPE line for {name}"));
        }
        Ok(())
    }

    /// Whether any sample has this exact name.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The declared type of a family, if any.
    pub fn type_of(&self, family: &str) -> Option<MetricType> {
        self.types.get(family).copied()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| format!("{line:?}: a sample needs a value"))?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut words = rest.split_whitespace();
    let value = words
        .next()
        .ok_or_else(|| format!("{name}: no value"))
        .and_then(parse_value)?;
    if let Some(ts) = words.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("{name}: timestamp {ts:?} is not an integer"))?;
    }
    if words.next().is_some() {
        return Err(format!("{name}: text after the value and timestamp"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `a="x",b="y"}` (after the `{`); returns what follows the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("a label needs `=`")?;
        let label = s[..eq].trim();
        check_label_name(label)?;
        let (value, rest) = quoted(s[eq + 1..].trim_start(), '"')?;
        if labels.insert(label.to_owned(), value).is_some() {
            return Err(format!("label {label} given twice"));
        }
        s = rest.trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected `,` or `}` after a label".into());
        }
    }
}

/// Reads a string in `quote`s with `\\`, `\"`/`\'` and `\n` escapes;
/// returns it and what follows the closing quote.
pub(crate) fn quoted(s: &str, quote: char) -> Result<(String, &str), String> {
    let mut chars = s.char_indices();
    if chars.next().map(|(_, c)| c) != Some(quote) {
        return Err(format!("expected a {quote}-quoted value"));
    }
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, c @ ('\\' | '"' | '\''))) => out.push(c),
                _ => return Err("bad escape in a quoted value".into()),
            },
            c if c == quote => return Ok((out, &s[i + c.len_utf8()..])),
            c => out.push(c),
        }
    }
    Err("unterminated quoted value".into())
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("{v:?} is not a number")),
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub(crate) fn check_metric_name(name: &str) -> Result<(), String> {
    let ok = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if ok && !name.is_empty() {
        Ok(())
    } else {
        Err(format!("{name:?} is not a metric name"))
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn check_label_name(name: &str) -> Result<(), String> {
    let ok = name
        .chars()
        .enumerate()
        .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()));
    if ok && !name.is_empty() {
        Ok(())
    } else {
        Err(format!("{name:?} is not a label name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP http_requests_total Requests by status code.
# TYPE http_requests_total counter
http_requests_total{code="200",method="GET"} 1027 1395066363000
http_requests_total{code="500",method="GET",} 3
# A free comment
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.005"} 24054
http_request_duration_seconds_bucket{le="0.1"} 33444
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320
# TYPE active_connections gauge
active_connections 7
msg{text="a \"quoted\" \\ value\nnext"} -Inf
odd_value NaN
"#;

    #[test]
    fn reads_counters_histograms_gauges_and_escapes() {
        let e = Exposition::parse(TEXT).unwrap();
        assert_eq!(e.samples.len(), 10);
        assert_eq!(e.type_of("http_requests_total"), Some(MetricType::Counter));
        assert_eq!(
            e.type_of("http_request_duration_seconds"),
            Some(MetricType::Histogram)
        );
        let first = &e.samples[0];
        assert_eq!(first.name, "http_requests_total");
        assert_eq!(first.labels["code"], "200");
        assert_eq!(first.labels["method"], "GET");
        assert_eq!(first.value, 1027.0);
        assert_eq!(e.samples[1].labels["code"], "500");
        assert_eq!(e.samples[3].value, 33444.0);
        assert_eq!(e.samples[4].labels["le"], "+Inf");
        assert_eq!(e.samples[8].labels["text"], "a \"quoted\" \\ value\nnext");
        assert_eq!(e.samples[8].value, f64::NEG_INFINITY);
        assert!(e.samples[9].value.is_nan());
        assert!(e.has("active_connections") && !e.has("active"));
    }

    #[test]
    fn refuses_malformed_lines_by_number() {
        for (text, line) in [
            ("ok 1\nbad", 2),
            ("1bad 1", 1),
            ("m{a=\"x\"", 1),
            ("m{a=x} 1", 1),
            ("m{a=\"x\" b=\"y\"} 1", 1),
            ("m{a=\"x\",a=\"y\"} 1", 1),
            ("m{a=\"\\q\"} 1", 1),
            ("m twelve", 1),
            ("m 1 2 3", 1),
            ("m 1 1.5", 1),
            ("# TYPE m countr", 1),
            ("# TYPE m counter\n# TYPE m gauge", 2),
            ("# TYPE m", 1),
            ("m{0a=\"x\"} 1", 1),
        ] {
            let e = Exposition::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }

    #[test]
    fn empty_text_has_no_samples() {
        let e = Exposition::parse("\n# only comments\n").unwrap();
        assert!(e.samples.is_empty());
    }
}
