//! The runbook as one list of typed steps: what each is called in the
//! journal, what it says in a plan, whether it changes the app, whether an
//! upgrade runs it, and what undoing it is called.
//!
//! A new step is one variant here: every `match` below (and the runner's
//! `run` and `undo` in `forward.rs` and `undo.rs`) must then say what it
//! does, and the compiler lists the places.

use crate::config::{AppConfig, Strategy};

use super::UpgradeSpec;

/// One step of the upgrade runbook, in the order [`Step::ALL`] runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// Version available, unit loaded, app healthy, disk space.
    Preflight,
    /// Files, the env file and the database, as `backup create` does.
    Backup,
    /// The package swap, by the package's kind.
    Package,
    /// Blue-green and canary: the new version installed as a release of its
    /// own; the live slot's is untouched.
    Release,
    /// The env-file edits.
    Config,
    /// The app's migrate command.
    Migrate,
    /// The unit restarted over D-Bus.
    Restart,
    /// Blue-green and canary: the idle slot pointed at the new release and
    /// its unit started.
    Start,
    /// The health probe must pass while the unit stays active.
    Health,
    /// The declared smoke checks.
    Smoke,
    /// Blue-green: every request to the new slot; canary: its share.
    /// Through the proxy, tested and reloaded.
    Switch,
    /// Health probed for the asked watch window.
    Watch,
    /// Canary: every request to the new slot.
    Promote,
    /// Blue-green and canary: the old slot keeps serving what it has for
    /// `drain`, then it is stopped.
    Drain,
}

impl Step {
    /// Every step, in the order an upgrade runs them.
    pub const ALL: [Step; 14] = [
        Step::Preflight,
        Step::Backup,
        Step::Package,
        Step::Release,
        Step::Config,
        Step::Migrate,
        Step::Restart,
        Step::Start,
        Step::Health,
        Step::Smoke,
        Step::Switch,
        Step::Watch,
        Step::Promote,
        Step::Drain,
    ];

    /// The step's name in the journal and the API (a persisted format:
    /// never rename one).
    pub fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Backup => "backup",
            Step::Package => "package",
            Step::Release => "release",
            Step::Config => "config",
            Step::Migrate => "migrate",
            Step::Restart => "restart",
            Step::Start => "start",
            Step::Health => "health",
            Step::Smoke => "smoke",
            Step::Switch => "switch",
            Step::Watch => "watch",
            Step::Promote => "promote",
            Step::Drain => "drain",
        }
    }

    /// The step a journaled name stands for.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the step changes the app: once one started, only a rollback
    /// gives the app back.
    pub fn changes_app(self) -> bool {
        match self {
            Step::Preflight | Step::Backup => false,
            Step::Package
            | Step::Release
            | Step::Config
            | Step::Migrate
            | Step::Restart
            | Step::Start
            | Step::Health
            | Step::Smoke
            | Step::Switch
            | Step::Watch
            | Step::Promote
            | Step::Drain => true,
        }
    }

    /// Whether this upgrade of `app` runs the step.
    pub fn applies(self, app: &AppConfig, spec: &UpgradeSpec) -> bool {
        let slotted = app.slotted().is_some();
        match self {
            Step::Preflight | Step::Backup => true,
            Step::Package | Step::Restart => !slotted,
            Step::Release | Step::Start | Step::Switch | Step::Drain => slotted,
            Step::Promote => app
                .slotted()
                .is_some_and(|d| d.strategy == Strategy::Canary),
            Step::Config => app.env_file.is_some() && !spec.env_edits.is_empty(),
            Step::Migrate => app.migrate.is_some(),
            Step::Health => app.health.is_some(),
            Step::Smoke => !app.smoke.is_empty(),
            Step::Watch => {
                spec.watch.is_some() && (app.health.is_some() || !app.analysis.is_empty())
            }
        }
    }

    /// What the step will do, as PlanUpgrade prints it and the journal
    /// describes it.
    pub fn describe(self, app: &AppConfig, spec: &UpgradeSpec, from_version: &str) -> String {
        match self {
            Step::Preflight => {
                let checks = "version available, unit loaded, app healthy, disk space";
                match crate::analysis::baseline_plan(app, spec.watch.is_some()) {
                    Some(baseline) => format!("{checks}; {baseline}"),
                    None => checks.into(),
                }
            }
            Step::Backup => {
                let paths = crate::backup::paths_of(app).len();
                let db = if app.database.is_some() {
                    " and the database"
                } else {
                    ""
                };
                format!("{paths} path(s){db}, as `backup create` does")
            }
            Step::Package => {
                let name = app.package.as_ref().map_or("?", |p| p.name());
                match from_version {
                    "" => format!("install {name} {}", spec.to_version),
                    from => format!("{name} {from} -> {}", spec.to_version),
                }
            }
            Step::Config => match &app.env_file {
                Some(env) => format!("{} edit(s) of {}", spec.env_edits.len(), env.display()),
                None => "no env file".into(),
            },
            Step::Migrate => {
                let command = app
                    .migrate
                    .as_ref()
                    .map_or_else(String::new, |m| m.command.join(" "));
                match app.slotted() {
                    // The guide's compatible-schema rule is what makes a
                    // switch back safe without restoring the database.
                    Some(_) => format!(
                        "{command}; the live version keeps serving on the migrated schema until \
                         the switch, so the migrations must be compatible with it"
                    ),
                    None => command,
                }
            }
            Step::Restart => format!("restart {}", app.unit),
            Step::Release | Step::Start | Step::Switch | Step::Promote | Step::Drain => {
                super::slotted::describe(self, app, spec)
            }
            Step::Health => match app.slotted() {
                Some(_) => {
                    "the health probe on the new slot's port must pass while its unit stays active"
                        .into()
                }
                None => "the health probe must pass while the unit stays active".into(),
            },
            Step::Smoke => format!("{} smoke check(s)", app.smoke.len()),
            Step::Watch => match spec.watch {
                Some(w) => {
                    let w = humantime::format_duration(w);
                    match crate::analysis::watch_plan(app) {
                        Some(rules) if app.health.is_some() => {
                            format!("probe health and {rules} for {w}")
                        }
                        Some(rules) => format!("{rules} for {w}"),
                        None => format!("probe health for {w}"),
                    }
                }
                None => "no watch window".into(),
            },
        }
    }

    /// The steps this upgrade runs, in order.
    pub fn plan(app: &AppConfig, spec: &UpgradeSpec) -> Vec<Step> {
        Step::ALL
            .into_iter()
            .filter(|s| s.applies(app, spec))
            .collect()
    }

    /// What undoing the step is called in the journal, for the steps whose
    /// effect a rollback must put back itself. The others are undone by
    /// the rollback's stop and start of the unit (restart, probes) or leave
    /// nothing behind (preflight).
    pub fn undo_name(self) -> Option<&'static str> {
        match self {
            Step::Backup => Some("rollback: files"),
            Step::Package => Some("rollback: package"),
            Step::Config => Some("rollback: config"),
            Step::Migrate => Some("rollback: database"),
            Step::Start => Some("rollback: new slot"),
            Step::Switch => Some("rollback: traffic"),
            Step::Drain => Some("rollback: old slot"),
            // The release stays beside the others (a retry reuses it); the
            // switch's undo also undoes a promote.
            Step::Preflight
            | Step::Release
            | Step::Restart
            | Step::Health
            | Step::Smoke
            | Step::Watch
            | Step::Promote => None,
        }
    }

    /// What the undo does, for the journal.
    pub fn undo_description(self) -> &'static str {
        match self {
            Step::Backup => "restore the app's other files that changed since the backup",
            Step::Package => "put back the previous package",
            Step::Config => "put back the env file",
            Step::Migrate => "undo the migrations",
            Step::Start => "stop the new slot and point it back where it was",
            Step::Switch => "send the requests back where they went before the upgrade",
            Step::Drain => "start the old slot again and check its health",
            Step::Preflight
            | Step::Release
            | Step::Restart
            | Step::Health
            | Step::Smoke
            | Step::Watch
            | Step::Promote => "",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The steps a rollback undoes, newest first, given the steps that started
/// (in any order, repeats allowed, as a journal lists them).
pub fn undo_order(started: impl IntoIterator<Item = Step>) -> Vec<Step> {
    let mut steps: Vec<Step> = started
        .into_iter()
        .filter(|s| s.undo_name().is_some())
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps.dedup();
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_a_distinct_name_that_round_trips() {
        let mut names: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
        for step in Step::ALL {
            assert_eq!(Step::from_name(step.name()), Some(step));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Step::ALL.len());
        assert_eq!(Step::from_name("rollback: package"), None);
        assert_eq!(Step::from_name("archive /srv/covet"), None);
    }

    #[test]
    fn all_is_in_running_order() {
        assert!(Step::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Step::ALL.first(), Some(&Step::Preflight));
        assert_eq!(Step::ALL.last(), Some(&Step::Drain));
    }

    #[test]
    fn only_preflight_and_backup_leave_the_app_as_it_was() {
        let unchanged: Vec<Step> = Step::ALL.into_iter().filter(|s| !s.changes_app()).collect();
        assert_eq!(unchanged, [Step::Preflight, Step::Backup]);
    }

    #[test]
    fn undo_runs_newest_first_and_once() {
        let started = [
            Step::Preflight,
            Step::Backup,
            Step::Package,
            Step::Config,
            Step::Migrate,
            Step::Restart,
            Step::Health,
        ];
        assert_eq!(
            undo_order(started),
            [Step::Migrate, Step::Config, Step::Package, Step::Backup]
        );
        // A journal may list a step twice (a resumed operation) and in any order.
        assert_eq!(
            undo_order([Step::Package, Step::Backup, Step::Package]),
            [Step::Package, Step::Backup]
        );
        assert_eq!(undo_order([Step::Preflight]), []);
        assert_eq!(undo_order([]), []);
    }

    #[test]
    fn the_down_migration_runs_before_the_old_package_is_back() {
        // The new version's code knows how to undo its own migrations.
        let order = undo_order(Step::ALL);
        let at = |s| order.iter().position(|x| *x == s).unwrap();
        assert!(at(Step::Migrate) < at(Step::Package));
        assert!(at(Step::Migrate) < at(Step::Config));
        assert!(at(Step::Package) < at(Step::Backup));
    }

    #[test]
    fn steps_that_need_their_own_undo_have_one() {
        for step in Step::ALL {
            let has_undo = step.undo_name().is_some();
            assert_eq!(
                has_undo,
                !step.undo_description().is_empty(),
                "{step}: an undo name and its description go together"
            );
        }
        assert!(Step::Package.undo_name().is_some());
        assert!(Step::Config.undo_name().is_some());
        assert!(Step::Migrate.undo_name().is_some());
    }

    #[test]
    fn the_plan_lists_only_what_this_upgrade_runs() {
        let app: AppConfig = toml::from_str(
            r#"
            name = "covet"
            unit = "covet.service"
            env_file = "/etc/covet/env"
            [package]
            kind = "pip"
            name = "covet"
            venv = "/srv/covet/venv"
            [health]
            url = "http://127.0.0.1:8000/health"
            "#,
        )
        .unwrap();
        let mut spec = UpgradeSpec {
            app: "covet".into(),
            to_version: crate::names::Version::parse("0.2.0").unwrap(),
            env_edits: Vec::new(),
            no_rollback: false,
            watch: None,
            force: false,
            canary: Vec::new(),
            step_wait: None,
        };
        assert_eq!(
            Step::plan(&app, &spec),
            [
                Step::Preflight,
                Step::Backup,
                Step::Package,
                Step::Restart,
                Step::Health
            ]
        );
        spec.env_edits = vec![crate::host::envfile::EnvEdit::Unset { key: "A".into() }];
        spec.watch = Some(std::time::Duration::from_secs(30));
        let plan = Step::plan(&app, &spec);
        assert!(plan.contains(&Step::Config) && plan.contains(&Step::Watch));
        assert!(!plan.contains(&Step::Migrate) && !plan.contains(&Step::Smoke));
        assert_eq!(
            Step::Package.describe(&app, &spec, "0.1.9"),
            "covet 0.1.9 -> 0.2.0"
        );
        assert_eq!(
            Step::Config.describe(&app, &spec, "0.1.9"),
            "1 edit(s) of /etc/covet/env"
        );
        assert_eq!(
            Step::Watch.describe(&app, &spec, ""),
            "probe health for 30s"
        );
    }

    #[test]
    fn a_slotted_plan_never_restarts_and_its_undo_switches_back_before_stopping_the_new_slot() {
        let app: AppConfig = toml::from_str(
            r#"
            name = "covet"
            unit = "covet.service"
            [package]
            kind = "pip"
            name = "covet"
            venv = "/srv/covet/venv"
            releases_dir = "/srv/covet/releases"
            [health]
            url = "http://127.0.0.1:8000/health"
            [deploy]
            strategy = "canary"
            unit_template = "covet@.service"
            slots = { blue = 8001, green = 8002 }
            slots_dir = "/nonexistent/covet-slots"
            [traffic]
            kind = "nginx"
            upstream_file = "/etc/nginx/conf.d/covet-upstream.conf"
            test = ["/usr/sbin/nginx", "-t"]
            reload_unit = "nginx.service"
            verify_url = "http://127.0.0.1/health"
            "#,
        )
        .unwrap();
        let spec = UpgradeSpec {
            app: "covet".into(),
            to_version: crate::names::Version::parse("0.2.0").unwrap(),
            env_edits: Vec::new(),
            no_rollback: false,
            watch: Some(std::time::Duration::from_secs(60)),
            force: false,
            canary: Vec::new(),
            step_wait: None,
        };
        assert_eq!(
            Step::plan(&app, &spec),
            [
                Step::Preflight,
                Step::Backup,
                Step::Release,
                Step::Start,
                Step::Health,
                Step::Switch,
                Step::Watch,
                Step::Promote,
                Step::Drain
            ]
        );
        assert_eq!(
            Step::Start.describe(&app, &spec, ""),
            "point slot blue at 0.2.0 and start covet@blue.service on port 8001"
        );
        assert!(
            Step::Switch
                .describe(&app, &spec, "")
                .starts_with("send 10% of the requests to slot blue")
        );
        assert_eq!(
            undo_order(Step::plan(&app, &spec)),
            [Step::Drain, Step::Switch, Step::Start, Step::Backup]
        );
    }
}
