//! The control socket: the daemon's one connection at a time (a new one replaces the old), the
//! requests it sends (`Sync`, `Set`, `Remove`) and the events the filter sends back, buffered
//! (bounded) while no daemon listens.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use sandboxd_api::egress::EgressDenial;
use sandboxd_protocol::egress::{FilterEvent, FilterRequest, FILTER_PROTOCOL_VERSION, MAX_LINE};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::policy::{Cut, Table};
use crate::shared::{is_transient, lock_table};
use crate::sys;

/// Most events kept for the daemon; past it the oldest are dropped (and counted).
pub const MAX_EVENTS: usize = 1024;
/// How often changed counters are reported.
pub const COUNTERS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("accept a control connection")]
    Accept(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<FilterEvent>,
    /// Events dropped since the last report of it.
    dropped: u64,
    /// A daemon is connected (counters are only queued then).
    connected: bool,
}

/// Events for the daemon, bounded.
#[derive(Debug, Default)]
pub struct Events {
    queue: Mutex<Queue>,
    ready: Notify,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (each operation
        // is a push or a pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, event: FilterEvent) {
        let mut q = self.lock();
        if q.events.len() >= MAX_EVENTS {
            q.events.pop_front();
            q.dropped += 1;
        }
        q.events.push_back(event);
        drop(q);
        self.ready.notify_one();
    }

    pub fn denied(&self, sandbox: Uuid, denial: EgressDenial) {
        self.push(FilterEvent::Denied { sandbox, denial });
    }

    fn connected(&self) -> bool {
        self.lock().connected
    }

    fn set_connected(&self, connected: bool) {
        self.lock().connected = connected;
    }

    /// The next batch to write, with a note first if events were dropped.
    pub(crate) fn take(&self) -> Vec<FilterEvent> {
        let mut q = self.lock();
        let mut out = Vec::with_capacity(q.events.len() + 1);
        if q.dropped > 0 {
            tracing::warn!(
                dropped = q.dropped,
                "events dropped while the daemon did not read them"
            );
            out.push(FilterEvent::Error {
                message: format!(
                    "the filter dropped {} events (at most {MAX_EVENTS} are kept while no daemon reads them)",
                    q.dropped
                ),
            });
            q.dropped = 0;
        }
        out.extend(q.events.drain(..));
        out
    }
}

/// The filter's shared state, as the control side sees it.
pub struct Control {
    pub table: Arc<Mutex<Table>>,
    pub events: Arc<Events>,
    pub daemon_uid: u32,
}

/// The denial event of a connection a policy change cut.
pub fn cut_event(cut: &Cut) -> FilterEvent {
    FilterEvent::Denied {
        sandbox: cut.sandbox,
        denial: EgressDenial {
            at: time::OffsetDateTime::now_utc(),
            protocol: "tcp".into(),
            address: Some(cut.dest),
            port: Some(cut.port),
            name: cut.name.clone(),
            reason: cut.reason,
        },
    }
}

impl Control {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        lock_table(&self.table)
    }

    /// Carry out one request line.
    pub fn handle_line(&self, line: &str) {
        let request: FilterRequest = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                self.events.push(FilterEvent::Error {
                    message: format!("bad request: {e}"),
                });
                return;
            }
        };
        match request {
            FilterRequest::Sync { mut sandboxes } => {
                // An oversized policy (the daemon refuses them) is left out, and said so; its
                // sandbox then has no policy here, so it reaches nothing.
                sandboxes.retain(|sp| match sp.policy.check_size() {
                    Ok(()) => true,
                    Err(e) => {
                        self.events.push(FilterEvent::Error {
                            message: format!("sandbox {}: {e}", sp.sandbox),
                        });
                        false
                    }
                });
                let n = sandboxes.len();
                let cuts = self.table().sync(sandboxes);
                self.report_cuts(&cuts);
                tracing::info!(sandboxes = n, cut = cuts.len(), "policies synced");
                self.push_counters(true);
            }
            FilterRequest::Set(sp) => {
                let (id, addr) = (sp.sandbox, sp.address);
                if let Err(e) = sp.policy.check_size() {
                    self.events.push(FilterEvent::Error {
                        message: format!("sandbox {id}: {e}"),
                    });
                    return;
                }
                let cuts = self.table().set(sp);
                self.report_cuts(&cuts);
                tracing::info!(sandbox = %id, address = %addr, cut = cuts.len(), "policy set");
            }
            FilterRequest::Remove { sandbox } => {
                let removed = self.table().remove(sandbox);
                tracing::info!(%sandbox, known = removed.is_some(), "policy removed");
                // The last totals, if they changed since last reported: the daemon keeps them.
                if let Some(stats) = removed.filter(|s| s.dirty.swap(false, Ordering::Relaxed)) {
                    self.events.push(FilterEvent::Counters {
                        sandbox,
                        counters: stats.snapshot(),
                    });
                }
            }
        }
    }

    fn report_cuts(&self, cuts: &[Cut]) {
        for cut in cuts {
            tracing::info!(sandbox = %cut.sandbox, dest = %cut.dest, port = cut.port,
                name = cut.name.as_deref().unwrap_or(""), reason = ?cut.reason,
                "connection cut by a policy change");
            self.events.push(cut_event(cut));
        }
    }

    /// Queue counters for every sandbox (`all`) or those changed since last reported.
    pub fn push_counters(&self, all: bool) {
        let changed: Vec<FilterEvent> = self
            .table()
            .entries()
            .filter(|e| e.stats.dirty.swap(false, Ordering::Relaxed) || all)
            .map(|e| FilterEvent::Counters {
                sandbox: e.id,
                counters: e.stats.snapshot(),
            })
            .collect();
        for ev in changed {
            self.events.push(ev);
        }
    }

    /// Accept daemon connections for ever; each new one replaces the one before.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) -> Result<(), ControlError> {
        let ticker = Arc::clone(&self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(COUNTERS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if ticker.events.connected() {
                    ticker.push_counters(false);
                }
            }
        });
        let mut current: Option<CancellationToken> = None;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "control accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(ControlError::Accept(e)),
            };
            match sys::peer_uid(&stream) {
                Ok(uid) if uid == self.daemon_uid => {}
                Ok(uid) => {
                    tracing::warn!(
                        uid,
                        want = self.daemon_uid,
                        "control connection from another uid refused"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control connection refused");
                    continue;
                }
            }
            if let Some(old) = current.take() {
                tracing::info!("a new daemon connection replaces the previous one");
                old.cancel();
            }
            let stop = CancellationToken::new();
            current = Some(stop.clone());
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.events.set_connected(true);
                let result = this.connection(stream, stop.clone()).await;
                // Only the current connection's end marks the daemon gone.
                if !stop.is_cancelled() {
                    this.events.set_connected(false);
                }
                match result {
                    Ok(()) => tracing::info!("daemon disconnected"),
                    Err(e) => tracing::warn!(error = %e, "daemon connection closed"),
                }
            });
        }
    }

    async fn connection(
        &self,
        stream: UnixStream,
        stop: CancellationToken,
    ) -> Result<(), std::io::Error> {
        let (read, mut write) = stream.into_split();
        let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        let ready = serde_json::to_string(&FilterEvent::Ready {
            version: FILTER_PROTOCOL_VERSION,
        })
        .map_err(std::io::Error::other)?;
        write.write_all(format!("{ready}\n").as_bytes()).await?;
        tracing::info!("daemon connected");
        let writer = async {
            loop {
                let batch = self.events.take();
                if batch.is_empty() {
                    self.events.ready.notified().await;
                    continue;
                }
                let mut buf = Vec::new();
                for ev in &batch {
                    serde_json::to_writer(&mut buf, ev).map_err(std::io::Error::other)?;
                    buf.push(b'\n');
                }
                write.write_all(&buf).await?;
            }
        };
        let reader = async {
            while let Some(line) = lines.next().await {
                let line = line.map_err(std::io::Error::other)?;
                if !line.trim().is_empty() {
                    self.handle_line(&line);
                }
            }
            Ok::<(), std::io::Error>(())
        };
        tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = stop.cancelled() => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_bounded_and_the_drop_is_reported() {
        let events = Events::default();
        for i in 0..MAX_EVENTS + 5 {
            events.push(FilterEvent::Error {
                message: i.to_string(),
            });
        }
        let batch = events.take();
        assert_eq!(batch.len(), MAX_EVENTS + 1);
        assert!(
            matches!(&batch[0], FilterEvent::Error { message } if message.contains("dropped 5 events"))
        );
        assert!(matches!(&batch[1], FilterEvent::Error { message } if message == "5"));
        assert!(events.take().is_empty());
    }

    #[test]
    fn requests_change_the_table_and_bad_ones_are_reported() {
        let control = Control {
            table: Arc::default(),
            events: Arc::default(),
            daemon_uid: 0,
        };
        let id = Uuid::new_v4();
        control.handle_line(&format!(
            r#"{{"op":"sync","sandboxes":[{{"sandbox":"{id}","address":"198.51.100.2","policy":{{"allow":["pypi.org"]}}}}]}}"#
        ));
        assert!(control
            .table()
            .get("198.51.100.2".parse().expect("addr"))
            .is_some());
        // A Sync reports every sandbox's counters.
        let batch = control.events.take();
        assert!(
            matches!(batch.as_slice(), [FilterEvent::Counters { sandbox, .. }] if *sandbox == id)
        );
        control.handle_line(r#"{"op":"nuke"}"#);
        assert!(matches!(
            control.events.take().as_slice(),
            [FilterEvent::Error { .. }]
        ));
        // Remove reports the last totals if they changed.
        let addr = "198.51.100.2".parse().expect("addr");
        {
            let t = control.table();
            let stats = &t.get(addr).expect("entry").stats;
            stats.add(&stats.bytes_out, 42);
        }
        control.handle_line(&format!(r#"{{"op":"remove","sandbox":"{id}"}}"#));
        assert!(control.table().get(addr).is_none());
        assert!(matches!(control.events.take().as_slice(),
            [FilterEvent::Counters { sandbox, counters }] if *sandbox == id && counters.bytes_out == 42));
        control.handle_line(&format!(r#"{{"op":"remove","sandbox":"{id}"}}"#));
        assert!(control.events.take().is_empty());
    }
}
