//! Series selectors, a documented subset of PromQL's: a metric name and
//! optional label matchers `=`, `!=`, `=~` and `!~` (regexes are anchored,
//! as in PromQL), values in double or single quotes:
//! `http_requests_total{code=~"5..",method!="OPTIONS"}`.

use std::collections::BTreeMap;

use super::exposition::{check_label_name, check_metric_name, quoted};

#[derive(Debug, Clone)]
pub enum Op {
    Eq(String),
    Ne(String),
    Re(regex::Regex),
    NotRe(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct Matcher {
    pub label: String,
    pub op: Op,
}

impl Matcher {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        // An absent label matches as the empty string, as in PromQL.
        let value = labels.get(&self.label).map_or("", String::as_str);
        match &self.op {
            Op::Eq(v) => value == v,
            Op::Ne(v) => value != v,
            Op::Re(re) => re.is_match(value),
            Op::NotRe(re) => !re.is_match(value),
        }
    }
}

/// A parsed selector.
#[derive(Debug, Clone)]
pub struct Selector {
    pub name: String,
    pub matchers: Vec<Matcher>,
    text: String,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        let fail = |why: String| format!("selector {text:?}: {why}");
        let s = text.trim();
        let (name, rest) = match s.find('{') {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let name = name.trim();
        check_metric_name(name).map_err(fail)?;
        let mut matchers = Vec::new();
        if let Some(mut s) = rest {
            loop {
                s = s.trim_start();
                if let Some(after) = s.strip_prefix('}') {
                    if !after.trim().is_empty() {
                        return Err(fail("text after `}`".into()));
                    }
                    break;
                }
                let op_at = s
                    .find(['=', '!'])
                    .ok_or_else(|| fail("a matcher needs =, !=, =~ or !~".into()))?;
                let label = s[..op_at].trim();
                check_label_name(label).map_err(fail)?;
                let after = &s[op_at..];
                let (kind, after) = ["=~", "!~", "!=", "="]
                    .into_iter()
                    .find_map(|op| after.strip_prefix(op).map(|rest| (op, rest)))
                    .ok_or_else(|| fail(format!("bad operator after {label}")))?;
                let after = after.trim_start();
                let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
                let quote =
                    quote.ok_or_else(|| fail(format!("the value of {label} must be quoted")))?;
                let (value, rest) = quoted(after, quote).map_err(fail)?;
                let regex = || {
                    regex::Regex::new(&format!("^(?:{value})$"))
                        .map_err(|e| fail(format!("{label}: bad regex {value:?}: {e}")))
                };
                let op = match kind {
                    "=" => Op::Eq(value),
                    "!=" => Op::Ne(value),
                    "=~" => Op::Re(regex()?),
                    _ => Op::NotRe(regex()?),
                };
                matchers.push(Matcher {
                    label: label.to_owned(),
                    op,
                });
                s = rest.trim_start();
                if let Some(rest) = s.strip_prefix(',') {
                    s = rest;
                } else if !s.starts_with('}') {
                    return Err(fail("expected `,` or `}` after a matcher".into()));
                }
            }
        }
        Ok(Selector {
            name: name.to_owned(),
            matchers,
            text: s.to_owned(),
        })
    }

    /// Whether a series of metric `name` with `labels` is selected.
    #[cfg(test)]
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        name == self.name && self.matches_labels(labels)
    }

    /// Whether the label matchers accept `labels` (the name aside).
    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|m| m.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_names_and_each_operator() {
        let s = Selector::parse("http_requests_total").unwrap();
        assert!(s.matchers.is_empty());
        assert!(s.matches("http_requests_total", &labels(&[("code", "200")])));
        assert!(!s.matches("http_requests", &labels(&[])));

        let s = Selector::parse(
            r#"http_requests_total{code=~"5..", method != 'OPTIONS',path!~"/health|/metrics",}"#,
        )
        .unwrap();
        assert_eq!(s.matchers.len(), 3);
        let hit = labels(&[("code", "503"), ("method", "GET"), ("path", "/api")]);
        assert!(s.matches("http_requests_total", &hit));
        for miss in [
            labels(&[("code", "200"), ("method", "GET"), ("path", "/api")]),
            labels(&[("code", "5000"), ("method", "GET"), ("path", "/api")]),
            labels(&[("code", "500"), ("method", "OPTIONS"), ("path", "/api")]),
            labels(&[("code", "500"), ("method", "GET"), ("path", "/health")]),
        ] {
            assert!(!s.matches("http_requests_total", &miss), "{miss:?}");
        }
        let s = Selector::parse(r#"up{job="a"}"#).unwrap();
        assert!(s.matches("up", &labels(&[("job", "a")])));
        assert!(!s.matches("up", &labels(&[])));
        assert_eq!(s.to_string(), r#"up{job="a"}"#);
        // An absent label is the empty string.
        let s = Selector::parse(r#"up{job=""}"#).unwrap();
        assert!(s.matches("up", &labels(&[])));
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for bad in [
            "",
            "5xx",
            "rate(http_requests_total[5m])",
            "m{code}",
            "m{code=5}",
            "m{code=\"5\"",
            "m{code==\"5\"}",
            "m{code=~\"(\"}",
            "m{code=\"5\"} extra",
            "m{code=\"5\" method=\"GET\"}",
            "m{0a=\"x\"}",
            "m{code>\"5\"}",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
