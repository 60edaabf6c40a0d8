//! Fan-out of read commands over many agents: which nodes, calling them
//! concurrently with a bound and a per-node deadline, one table or one JSON
//! array for all of them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use futures_util::StreamExt as _;
use serde_json::json;

use crate::output;
use crate::target::{Node, Target};
use crate::{Global, Output};

/// Options of every command that can run on several nodes.
#[derive(clap::Args, Clone, Default)]
pub struct FleetArgs {
    /// Nodes HOST:PORT to ask, separated by commas (default: the context's endpoints).
    #[arg(
        short = 'n',
        long = "nodes",
        value_delimiter = ',',
        conflicts_with = "nodes_file"
    )]
    pub nodes: Vec<String>,
    /// A file naming the nodes, one HOST:PORT a line (`#` starts a comment).
    #[arg(long = "nodes-file", value_name = "FILE")]
    pub nodes_file: Option<PathBuf>,
    /// How many nodes to talk to at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel: u32,
}

/// The nodes a command addresses, and how to reach them.
pub struct Fleet {
    pub target: Target,
    pub endpoints: Vec<String>,
    pub parallel: usize,
}

impl Fleet {
    /// `--nodes`, else `--nodes-file`, else `-e`, else the context's endpoints.
    pub fn resolve(g: &Global, args: &FleetArgs) -> anyhow::Result<Fleet> {
        let target = Target::resolve(g)?;
        let endpoints = if !args.nodes.is_empty() {
            args.nodes.clone()
        } else if let Some(file) = &args.nodes_file {
            read_nodes_file(file)?
        } else {
            target.endpoints.clone()
        };
        if endpoints.is_empty() {
            return Err(anyhow!(
                "context {} has no endpoint: pass -e HOST:PORT or --nodes",
                target.context
            ));
        }
        Ok(Fleet {
            target,
            endpoints,
            parallel: usize::try_from(args.parallel).unwrap_or(32),
        })
    }

    /// One node: the command keeps its single-node output.
    pub fn is_single(&self) -> bool {
        self.endpoints.len() == 1
    }

    /// Calls every node through `call`, at most `parallel` at once, each
    /// bounded by `--timeout` (connecting included). Results are in the
    /// order of the nodes; a node that fails carries its error in words.
    pub async fn fan_out<T, F, Fut>(
        &self,
        g: &Global,
        call: F,
    ) -> anyhow::Result<Vec<NodeResult<T>>>
    where
        F: Fn(Node) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let tls = self.target.tls()?;
        let call = &call;
        let results = futures_util::stream::iter(self.endpoints.iter())
            .map(|endpoint| {
                let tls = Arc::clone(&tls);
                async move {
                    let attempt = async {
                        let node = self
                            .target
                            .connect(endpoint, tls, g.timeout, g.timeout)
                            .await?;
                        call(node).await
                    };
                    let result = match tokio::time::timeout(g.timeout, attempt).await {
                        Ok(Ok(value)) => Ok(value),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(_) => Err(format!(
                            "{endpoint}: no answer within {}",
                            humantime::format_duration(g.timeout)
                        )),
                    };
                    NodeResult {
                        endpoint: endpoint.clone(),
                        result,
                    }
                }
            })
            .buffered(self.parallel)
            .collect()
            .await;
        Ok(results)
    }
}

fn read_nodes_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the nodes file {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// What one node answered, or why it did not.
pub struct NodeResult<T> {
    pub endpoint: String,
    pub result: Result<T, String>,
}

/// How a fleet command shows each node's answer.
pub struct Report<'a, T> {
    /// Columns after NODE (ERROR is added last).
    pub header: &'a [&'a str],
    /// Rows for a node's answer (a node may have several: units, backups).
    pub rows: &'a dyn Fn(&T) -> Vec<Vec<String>>,
    /// The node's answer as JSON (an object; `endpoint` is added).
    pub json: &'a dyn Fn(&T) -> serde_json::Value,
    /// Whether the answer counts as a success (e.g. an app that is healthy).
    pub ok: &'a dyn Fn(&T) -> bool,
}

impl<T> Report<'_, T> {
    /// Prints the table (or the JSON array) and returns 0 when every node
    /// answered and succeeded, else 1.
    pub fn print(&self, g: &Global, results: &[NodeResult<T>]) -> ExitCode {
        if g.output == Output::Json {
            output::json(&serde_json::Value::Array(
                results.iter().map(|r| self.node_json(r)).collect(),
            ));
        } else {
            self.table(results);
        }
        let all_ok = results
            .iter()
            .all(|r| r.result.as_ref().is_ok_and(|v| (self.ok)(v)));
        if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn node_json(&self, r: &NodeResult<T>) -> serde_json::Value {
        match &r.result {
            Ok(value) => {
                let mut object = (self.json)(value);
                if let Some(map) = object.as_object_mut() {
                    map.insert("endpoint".into(), json!(r.endpoint));
                    map.insert("ok".into(), json!((self.ok)(value)));
                    map.insert("error".into(), serde_json::Value::Null);
                }
                object
            }
            Err(e) => json!({ "endpoint": r.endpoint, "ok": false, "error": e }),
        }
    }

    fn table(&self, results: &[NodeResult<T>]) {
        let mut header = vec!["NODE"];
        header.extend_from_slice(self.header);
        header.push("ERROR");
        let mut rows = Vec::new();
        for r in results {
            match &r.result {
                Ok(value) => rows.extend((self.rows)(value).into_iter().map(|row| {
                    let mut line = vec![r.endpoint.clone()];
                    line.extend(row);
                    line.push(String::new());
                    line
                })),
                Err(e) => {
                    let mut line = vec![r.endpoint.clone()];
                    line.extend(self.header.iter().map(|_| "-".to_owned()));
                    line.push(e.clone());
                    rows.push(line);
                }
            }
        }
        output::table(&header, &rows);
    }
}

impl Fleet {
    /// Connects to the only node, as single-node commands always have.
    pub async fn single_node(&self, g: &Global) -> anyhow::Result<Node> {
        let endpoint = self.endpoints.first().ok_or_else(|| anyhow!("no node"))?;
        self.target
            .connect(endpoint, self.target.tls()?, g.timeout, g.timeout)
            .await
    }
}
