//! Following long operations: events as they happen (progress bars on a
//! terminal, plain lines otherwise), the final state as the exit code, and
//! `covetctl ops …`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use covet_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::fleet::{Fleet, FleetArgs, Report};
use crate::output;
use crate::target::{Node, connect_node};
use crate::{Global, Output};

/// Exit codes of commands that run operations.
pub const EXIT_ROLLED_BACK: u8 = 3;
pub const EXIT_NEEDS_HUMAN: u8 = 4;

/// A proto enum value in words: `OPERATION_STATE_ROLLED_BACK` -> `rolled_back`.
fn enum_name<E: TryFrom<i32>>(value: i32, prefix: &str, name: fn(&E) -> &'static str) -> String {
    E::try_from(value)
        .map(|e| name(&e).trim_start_matches(prefix).to_lowercase())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn state_name(state: i32) -> String {
    enum_name(state, "OPERATION_STATE_", pb::OperationState::as_str_name)
}

fn kind_name(kind: i32) -> String {
    enum_name(kind, "OPERATION_KIND_", pb::OperationKind::as_str_name)
}

fn outcome_name(o: i32) -> String {
    enum_name(o, "STEP_OUTCOME_", pb::StepOutcome::as_str_name)
}

async fn get_operation(
    client: &mut pb::operation_service_client::OperationServiceClient<tonic::transport::Channel>,
    node: &Node,
    id: String,
) -> anyhow::Result<pb::Operation> {
    Ok(client
        .get_operation(pb::GetOperationRequest { id })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner())
}

pub fn exit_code(op: &pb::Operation) -> ExitCode {
    match pb::OperationState::try_from(op.state) {
        Ok(pb::OperationState::Succeeded) => ExitCode::SUCCESS,
        Ok(pb::OperationState::RolledBack) => ExitCode::from(EXIT_ROLLED_BACK),
        Ok(pb::OperationState::NeedsHuman) => ExitCode::from(EXIT_NEEDS_HUMAN),
        _ => ExitCode::FAILURE,
    }
}

pub fn operation_json(op: &pb::Operation) -> serde_json::Value {
    let by = op.requested_by.clone().unwrap_or_default();
    json!({
        "id": op.id,
        "kind": kind_name(op.kind),
        "app": op.app,
        "state": state_name(op.state),
        "created": output::timestamp(op.created.as_ref()),
        "updated": output::timestamp(op.updated.as_ref()),
        "finished": output::timestamp(op.finished.as_ref()),
        "requested_by": by.common_name,
        "cause": op.cause,
        "needs_human": op.needs_human,
        "backup_id": op.backup_id,
        "current_step": op.current_step,
        "last_sequence": op.last_sequence,
        "params": op.params,
        "steps": op.steps.iter().map(|s| json!({
            "name": s.name,
            "outcome": outcome_name(s.outcome),
            "started": output::timestamp(s.started.as_ref()),
            "finished": output::timestamp(s.finished.as_ref()),
            "duration_ms": step_millis(s),
            "detail": s.detail,
        })).collect::<Vec<_>>(),
    })
}

/// How long a finished step took, in milliseconds (None while it runs).
fn step_millis(step: &pb::StepRecord) -> Option<u64> {
    let started = std::time::SystemTime::try_from(step.started?).ok()?;
    let finished = std::time::SystemTime::try_from(step.finished?).ok()?;
    let took = finished.duration_since(started).ok()?;
    u64::try_from(took.as_millis()).ok()
}

pub fn print_operation(op: &pb::Operation) {
    output::fields(&[
        ("operation", op.id.clone()),
        ("kind", kind_name(op.kind)),
        ("app", op.app.clone()),
        ("state", state_name(op.state)),
        (
            "requested by",
            op.requested_by.clone().unwrap_or_default().common_name,
        ),
        ("created", output::timestamp(op.created.as_ref())),
        ("finished", output::timestamp(op.finished.as_ref())),
        ("backup", op.backup_id.clone()),
    ]);
    if !op.cause.is_empty() {
        println!("cause: {}", op.cause);
    }
    if !op.needs_human.is_empty() {
        println!("NEEDS A HUMAN: {}", op.needs_human);
    }
    if !op.steps.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = op
            .steps
            .iter()
            .map(|s| vec![s.name.clone(), outcome_name(s.outcome), s.detail.clone()])
            .collect();
        output::table(&["STEP", "OUTCOME", "DETAIL"], &rows);
    }
}

/// Renders events for a person: bars on a terminal, lines otherwise.
struct Renderer {
    tty: bool,
    bar: Option<(String, ProgressBar)>,
    last_plain: Option<Instant>,
    table: crate::analysis::LiveTable,
}

impl Renderer {
    fn new() -> Renderer {
        Renderer {
            tty: std::io::stderr().is_terminal(),
            bar: None,
            last_plain: None,
            table: Default::default(),
        }
    }

    fn line(&mut self, text: String) {
        self.table.interrupted();
        match &self.bar {
            Some((_, bar)) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn end_bar(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn event(&mut self, e: &pb::OperationEvent) {
        use pb::operation_event::Event;
        let Some(event) = &e.event else { return };
        match event {
            Event::StepStarted(s) => {
                self.end_bar();
                self.line(format!(
                    "==> {}{}",
                    s.step,
                    if s.description.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.description)
                    }
                ));
            }
            Event::StepFinished(s) => {
                self.end_bar();
                let mark = match outcome_name(s.outcome).as_str() {
                    "succeeded" => "ok",
                    "interrupted" => "INTERRUPTED",
                    _ => "FAILED",
                };
                self.line(format!(
                    "    {mark} {}{}",
                    s.step,
                    if s.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.detail)
                    }
                ));
            }
            Event::Output(o) => self.line(format!("    | {}", o.line)),
            Event::Progress(p) => self.progress(p),
            Event::StateChanged(s) => {
                self.end_bar();
                let state = state_name(s.state);
                if state != "running" {
                    self.line(format!(
                        "state: {state}{}",
                        if s.cause.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", s.cause)
                        }
                    ));
                }
            }
            Event::Note(n) => self.line(format!("    note: {}", n.text)),
            Event::Analysis(a) if self.tty && self.bar.is_none() => {
                println!("{}", self.table.update(a));
            }
            Event::Analysis(a) => self.line(format!("    {}", crate::analysis::line(a))),
        }
    }

    fn progress(&mut self, p: &pb::Progress) {
        if self.tty {
            let bar = match &self.bar {
                Some((step, bar)) if *step == p.step => bar.clone(),
                _ => {
                    self.end_bar();
                    let bar = ProgressBar::new(p.total.max(1));
                    let style = ProgressStyle::with_template(
                        "    {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    self.bar = Some((p.step.clone(), bar.clone()));
                    bar
                }
            };
            if p.total > 0 {
                bar.set_length(p.total);
            }
            bar.set_position(p.done);
            return;
        }
        // Plain output: a line every few seconds at most.
        let due = self
            .last_plain
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if due || (p.total > 0 && p.done >= p.total) {
            self.last_plain = Some(Instant::now());
            let pct = if p.total > 0 {
                format!(" ({:.0}%)", p.done as f64 * 100.0 / p.total as f64)
            } else {
                String::new()
            };
            self.line(format!(
                "    {}: {} of {}{pct}",
                p.step,
                output::bytes(p.done),
                if p.total > 0 {
                    output::bytes(p.total)
                } else {
                    "?".into()
                }
            ));
        }
    }
}

/// Follows an operation to its end, resuming the event stream if it breaks,
/// then prints the final operation and returns its exit code.
pub async fn follow(
    g: &Global,
    node: &Node,
    op: pb::Operation,
    from: u64,
) -> anyhow::Result<ExitCode> {
    let mut renderer = Renderer::new();
    let quiet = g.output == Output::Json;
    if !quiet {
        println!("operation {} ({} of {})", op.id, kind_name(op.kind), op.app);
    }
    let mut readings = Vec::new();
    let final_op = watch_to_end(node, &op.id, from, |event| match event {
        Watched::Event(e) if !quiet => renderer.event(e),
        Watched::Resuming(text) => tracing_note(quiet, text),
        Watched::Event(e) => readings.extend(analysis_of(e)),
    })
    .await?;
    renderer.end_bar();
    if quiet {
        output::json(&with_analysis(operation_json(&final_op), &readings));
    } else {
        println!();
        print_operation(&final_op);
    }
    Ok(exit_code(&final_op))
}

/// The analysis reading an event carries, if it is one.
fn analysis_of(e: &pb::OperationEvent) -> Option<serde_json::Value> {
    match &e.event {
        Some(pb::operation_event::Event::Analysis(a)) => Some(crate::analysis::reading_json(a)),
        _ => None,
    }
}

/// The operation's JSON with its analysis series (when it has one).
fn with_analysis(mut op: serde_json::Value, readings: &[serde_json::Value]) -> serde_json::Value {
    if !readings.is_empty() {
        op["analysis"] = serde_json::Value::Array(readings.to_vec());
    }
    op
}

/// What [`watch_to_end`] reports as it goes.
pub enum Watched<'a> {
    Event(&'a pb::OperationEvent),
    /// The event stream broke and is being resumed (why, in words).
    Resuming(&'a str),
}

/// Watches an operation's events from sequence `from` until it ends,
/// resuming a broken stream a few times, and returns the final operation.
pub async fn watch_to_end(
    node: &Node,
    id: &str,
    from: u64,
    mut on: impl FnMut(Watched<'_>),
) -> anyhow::Result<pb::Operation> {
    let mut client =
        pb::operation_service_client::OperationServiceClient::new(node.channel.clone());
    let mut next = from.max(1);
    let mut failures = 0;
    loop {
        let request = pb::WatchOperationRequest {
            id: id.to_owned(),
            from_sequence: next,
        };
        let mut stream = match client.watch_operation(request).await {
            Ok(s) => s.into_inner(),
            Err(status) if failures < 5 && status.code() == tonic::Code::Unavailable => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(status) => return Err(node.fail(status)),
        };
        let ended = loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    next = e.sequence + 1;
                    on(Watched::Event(&e));
                }
                Ok(None) => break true,
                Err(status) if failures < 5 => {
                    failures += 1;
                    on(Watched::Resuming(&format!(
                        "event stream broke ({}); resuming from event {next}",
                        status.message()
                    )));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break false;
                }
                Err(status) => return Err(node.fail(status)),
            }
        };
        if ended {
            break;
        }
    }
    Ok(client
        .get_operation(pb::GetOperationRequest { id: id.to_owned() })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner())
}

fn tracing_note(quiet: bool, text: &str) {
    if !quiet {
        eprintln!("covetctl: {text}");
    }
}

async fn list(
    g: &Global,
    request: pb::ListOperationsRequest,
    fleet: &FleetArgs,
) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        let operations = fetch_operations(&node, request).await?;
        if g.output == Output::Json {
            output::json(&operations_json(&operations));
        } else {
            output::table(
                OPERATION_HEADER,
                &operations.iter().map(operation_row).collect::<Vec<_>>(),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let request = &request;
    let results = fleet
        .fan_out(g, |node| async move {
            fetch_operations(&node, request.clone()).await
        })
        .await?;
    let report = Report {
        header: OPERATION_HEADER,
        rows: &|ops: &Vec<pb::Operation>| ops.iter().map(operation_row).collect(),
        json: &|ops: &Vec<pb::Operation>| operations_json(ops),
        ok: &|_| true,
    };
    Ok(report.print(g, &results))
}

async fn fetch_operations(
    node: &Node,
    request: pb::ListOperationsRequest,
) -> anyhow::Result<Vec<pb::Operation>> {
    let mut client =
        pb::operation_service_client::OperationServiceClient::new(node.channel.clone());
    Ok(client
        .list_operations(request)
        .await
        .map_err(|s| node.fail(s))?
        .into_inner()
        .operations)
}

fn operations_json(ops: &[pb::Operation]) -> serde_json::Value {
    json!({ "operations": ops.iter().map(operation_json).collect::<Vec<_>>() })
}

const OPERATION_HEADER: &[&str] = &["ID", "KIND", "APP", "STATE", "CREATED", "BY", "CAUSE"];

fn operation_row(o: &pb::Operation) -> Vec<String> {
    vec![
        o.id.clone(),
        kind_name(o.kind),
        o.app.clone(),
        state_name(o.state),
        output::timestamp(o.created.as_ref()),
        o.requested_by.clone().unwrap_or_default().common_name,
        o.cause.clone(),
    ]
}

#[derive(Subcommand)]
pub enum OpsCommand {
    /// Operations, newest first.
    List {
        /// Only this app's.
        #[arg(long)]
        app: Option<String>,
        /// Only those not over yet.
        #[arg(long)]
        active: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// One operation, with its steps.
    Show { id: String },
    /// Follow an operation's events until it ends (resume with --from).
    Watch {
        id: String,
        /// First event sequence number to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Cancel a running operation (an upgrade then rolls back).
    Cancel { id: String },
}

pub async fn ops(g: &Global, cmd: OpsCommand) -> anyhow::Result<ExitCode> {
    if let OpsCommand::List {
        app,
        active,
        limit,
        fleet,
    } = cmd
    {
        let request = pb::ListOperationsRequest {
            app: app.unwrap_or_default(),
            active_only: active,
            limit,
        };
        return list(g, request, &fleet).await;
    }
    let node = connect_node(g).await?;
    let mut client =
        pb::operation_service_client::OperationServiceClient::new(node.channel.clone());
    match cmd {
        OpsCommand::List { .. } => Ok(ExitCode::SUCCESS), // answered above, on every node
        OpsCommand::Show { id } => {
            let op = get_operation(&mut client, &node, id).await?;
            if g.output == Output::Json {
                // A finished operation's events end: its analysis series.
                let mut readings = Vec::new();
                if !matches!(
                    state_name(op.state).as_str(),
                    "running" | "pending" | "rolling_back"
                ) {
                    watch_to_end(&node, &op.id, 1, |event| {
                        if let Watched::Event(e) = event {
                            readings.extend(analysis_of(e));
                        }
                    })
                    .await?;
                }
                output::json(&with_analysis(operation_json(&op), &readings));
            } else {
                print_operation(&op);
            }
            Ok(ExitCode::SUCCESS)
        }
        OpsCommand::Watch { id, from } => {
            let op = get_operation(&mut client, &node, id).await?;
            follow(g, &node, op, from).await
        }
        OpsCommand::Cancel { id } => {
            let op = client
                .cancel_operation(pb::CancelOperationRequest { id })
                .await
                .map_err(|s| node.fail(s))?
                .into_inner();
            if g.output == Output::Json {
                output::json(&operation_json(&op));
            } else {
                println!(
                    "asked operation {} to stop; follow it with `covetctl ops watch {}`",
                    op.id, op.id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
