//! Following one operation: its stored events from a sequence on, then the
//! live ones as they are appended, until the operation ends or the reader
//! goes away. A reader that falls behind is caught up from the log.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::ops::log::{EventBody, EventRecord, OpLog, OpLogError};

/// Events one watch may have in flight before it waits for its reader.
const BUFFERED: usize = 64;

fn ends_operation(e: &EventRecord) -> bool {
    matches!(&e.body, EventBody::StateChanged { state, .. } if state.is_final())
}

/// The events of operation `id` from `from_sequence` (1 when 0) on. An
/// unknown id is `NotFound` before anything is held for the caller; the
/// live subscription is taken before the stored events are read, so
/// nothing falls between.
pub fn watch(
    oplog: &Arc<OpLog>,
    id: &str,
    from_sequence: u64,
) -> Result<mpsc::Receiver<Result<EventRecord, OpLogError>>, OpLogError> {
    let oplog = oplog.clone();
    let op = oplog.get(id)?;
    let mut live = oplog.subscribe(id)?;
    let stored = oplog.events_from(id, from_sequence.max(1))?;
    let (tx, rx) = mpsc::channel(BUFFERED);
    tokio::spawn(async move {
        let mut last = from_sequence.saturating_sub(1);
        let mut over = op.state.is_final() && op.last_sequence <= last;
        for e in stored {
            last = e.sequence;
            over |= ends_operation(&e);
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        while !over {
            let next = tokio::select! {
                next = live.recv() => next,
                _ = tx.closed() => return,
            };
            let batch = match next {
                Ok(e) if e.sequence <= last => continue,
                Ok(e) if e.sequence == last + 1 => vec![e],
                // A gap (we lagged behind, or the channel closed): read the log.
                _ => match oplog.events_from(&op.id, last + 1) {
                    Ok(events) => events,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            };
            if batch.is_empty() {
                // The channel closed with nothing new: the operation is over.
                match oplog.get(&op.id) {
                    Ok(now) if now.state.is_final() => return,
                    _ => match oplog.subscribe(&op.id) {
                        Ok(again) => {
                            live = again;
                            continue;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    },
                }
            }
            for e in batch {
                last = e.sequence;
                over |= ends_operation(&e);
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}
