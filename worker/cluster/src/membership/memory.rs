//! In-process membership: the single-machine default. The coordinator registers the workers
//! it was given; there is one coordinator, so it always leads.

use std::sync::Mutex;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Leadership, Lease, MemberEvent, Membership, MembershipError, WorkerCard};

#[derive(Debug, Default)]
pub struct MemoryMembership {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    cards: Vec<WorkerCard>,
    watchers: Vec<mpsc::UnboundedSender<MemberEvent>>,
    plan: Option<String>,
}

impl MemoryMembership {
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes a worker's card (what a lease expiry does on etcd).
    pub fn remove(&self, id: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.cards.retain(|c| c.id != id);
        s.watchers.retain(|w| w.send(MemberEvent::Down(id.to_owned())).is_ok());
    }
}

/// A lease nothing keeps: in-process membership has nothing to revoke, and it never lapses.
fn held() -> Lease {
    let ended = CancellationToken::new();
    ended.cancel();
    let forever = std::time::Instant::now() + std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    Lease::new(CancellationToken::new(), CancellationToken::new(), ended, tokio::sync::watch::channel(forever).1)
}

#[tonic::async_trait]
impl Membership for MemoryMembership {
    async fn register(&self, card: &WorkerCard) -> Result<Lease, MembershipError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.cards.retain(|c| c.id != card.id);
        s.cards.push(card.clone());
        s.watchers.retain(|w| w.send(MemberEvent::Up(card.clone())).is_ok());
        Ok(held())
    }

    fn watch_workers(&self) -> mpsc::UnboundedReceiver<MemberEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(MemberEvent::Snapshot(s.cards.clone()));
        s.watchers.push(tx);
        rx
    }

    async fn campaign(&self, id: &str) -> Result<Leadership, MembershipError> {
        Ok(Leadership { id: id.to_owned(), lease: held() })
    }

    async fn load_plan(&self) -> Result<Option<String>, MembershipError> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).plan.clone())
    }

    async fn store_plan(&self, plan: &str, _: &str) -> Result<(), MembershipError> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).plan = Some(plan.to_owned());
        Ok(())
    }
}
