//! Which backups operations still need: a running operation's backup, and
//! the backup of each app's last successful upgrade (its rollback point).
//! Such a backup is listed with its references and is never deleted or pruned.

use std::collections::{HashMap, HashSet};

use crate::ops::log::{OpKind, OpState, OperationRecord};

/// Backup id → the ids of the operations that still need it. `ops` come
/// newest first, as the operation log lists them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References(HashMap<String, Vec<String>>);

impl References {
    pub fn of(ops: impl IntoIterator<Item = OperationRecord>) -> References {
        let mut refs: HashMap<String, Vec<String>> = HashMap::new();
        let mut last_upgrade_seen = HashSet::new();
        for op in ops {
            if op.backup_id.is_empty() {
                continue;
            }
            let rollback_point = op.kind == OpKind::Upgrade
                && op.state == OpState::Succeeded
                && last_upgrade_seen.insert(op.app.clone());
            if !op.state.is_final() || rollback_point {
                refs.entry(op.backup_id).or_default().push(op.id);
            }
        }
        References(refs)
    }

    /// The operations that need backup `id`, newest first; empty when none does.
    pub fn of_backup(&self, id: &str) -> &[String] {
        self.0.get(id).map(Vec::as_slice).unwrap_or_default()
    }

    /// Every backup some operation needs.
    pub fn backups(&self) -> HashSet<String> {
        self.0.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn op(id: &str, kind: OpKind, app: &str, state: OpState, backup: &str) -> OperationRecord {
        OperationRecord {
            id: id.into(),
            kind,
            app: app.into(),
            state,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            finished: None,
            requested_by: Default::default(),
            cause: String::new(),
            needs_human: String::new(),
            backup_id: backup.into(),
            current_step: String::new(),
            last_sequence: 0,
            params: Default::default(),
            steps: Vec::new(),
        }
    }

    #[test]
    fn running_operations_and_each_apps_last_upgrade_hold_their_backups() {
        use OpKind::*;
        use OpState::*;
        let refs = References::of([
            op("bk-3", BackupRestore, "covet", Running, "b3"),
            op("up-2", Upgrade, "covet", Succeeded, "b2"),
            op("up-1", Upgrade, "covet", Succeeded, "b1"),
            op("up-s", Upgrade, "shop", Succeeded, "s1"),
            op("up-f", Upgrade, "shop", Failed, "s0"),
            op("bk-v", BackupVerify, "shop", Succeeded, "s1"),
            op("bk-x", BackupCreate, "shop", Running, ""),
        ]);
        assert_eq!(refs.of_backup("b3"), ["bk-3"]);
        assert_eq!(refs.of_backup("b2"), ["up-2"]);
        assert!(
            refs.of_backup("b1").is_empty(),
            "an older upgrade is no rollback point"
        );
        assert_eq!(refs.of_backup("s1"), ["up-s"]);
        assert!(
            refs.of_backup("s0").is_empty(),
            "a failed upgrade holds nothing"
        );
        let mut all: Vec<_> = refs.backups().into_iter().collect();
        all.sort();
        assert_eq!(all, ["b2", "b3", "s1"]);
        assert_eq!(References::of([]), References::default());
    }
}
