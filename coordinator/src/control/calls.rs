//! Calls to workers that the controller's loop starts as tasks of their own (it never waits
//! on a worker): fences of the workers of ended replicas, health probes of suspects, and the
//! release of drained workers.

use std::time::Duration;

use proto::tramontane::worker::v1 as wpb;

use super::{ControlError, Controller, Report};
use crate::replica::WorkerCallError;

impl Controller {
    /// Fences the workers of ended replicas at the stored plan's epoch (`self.epoch`), each
    /// in a task of its own (the loop never waits on a worker): they unload what is older and
    /// refuse older epochs, so a worker this coordinator gave up on (its lease expired while
    /// it still answers) or a former leader's worker serves nobody from an old placement, and
    /// a reshaped worker drops its old rank (the plan's own, of this epoch, stays). An
    /// unreachable worker is not waited for: it serves no one.
    pub(super) fn fence(&mut self) {
        let epoch = self.epoch;
        for (id, address) in std::mem::take(&mut self.unfenced) {
            let Some(address) = address.or_else(|| self.cards.get(&id).map(|c| c.address.clone())) else { continue };
            let dialer = self.cfg.dialer.clone();
            tokio::spawn(async move {
                let call = async { dialer.connect(&address).await?.fence(wpb::FenceRequest { epoch }).await.map_err(WorkerCallError::Failed) };
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(_)) => tracing::info!(worker = %id, %address, epoch, "fenced a worker the placement no longer uses"),
                    Ok(Err(e)) => tracing::info!(worker = %id, %address, epoch, error = %e, "could not fence a worker"),
                    Err(_) => tracing::info!(worker = %id, %address, epoch, "could not fence a worker: no answer within 5 s"),
                }
            });
        }
    }

    /// Probes the suspects in a task (one probe at a time); see [`Controller::probed`].
    pub(super) fn probe_suspects(&mut self) {
        if self.probing || self.suspects.is_empty() {
            return;
        }
        self.probing = true;
        let targets: Vec<(String, Option<String>)> = self.suspects.iter().map(|id| (id.clone(), self.cards.get(id).map(|c| c.address.clone()))).collect();
        let (reports, dialer) = (self.reports.clone(), self.cfg.dialer.clone());
        tokio::spawn(async move {
            let _ = reports.send(Report::Probed(dialer.health_of(targets).await));
        });
    }

    /// Suspects that answer again are usable again; their cards take what the answer says
    /// (a worker restarted at the same address is a new process).
    pub(super) fn probed(&mut self, answers: Vec<(String, Option<wpb::HealthResponse>)>) {
        self.probing = false;
        for (id, health) in answers {
            let back = health.is_some();
            if let (Some(h), Some(card)) = (health, self.cards.get_mut(&id)) {
                card.pid = h.pid;
                card.restarts = h.restarts;
                if h.memory_bytes > 0 {
                    card.memory_bytes = h.memory_bytes;
                }
            }
            if back || !self.cards.contains_key(&id) {
                self.suspects.remove(&id);
                self.dirty |= back;
            }
        }
    }

    /// Releases (in tasks) the drained workers nothing uses any more; who waited is answered
    /// once the worker has been told.
    pub(super) fn release_drained(&mut self) {
        let in_use = self.in_use();
        let done: Vec<String> = self.draining.keys().filter(|id| !in_use.contains(id)).cloned().collect();
        for id in done {
            let waiters = self.draining.remove(&id).unwrap_or_default();
            let address = self.cards.remove(&id).map(|c| c.address);
            let epoch = self.epoch;
            let dialer = self.cfg.dialer.clone();
            tokio::spawn(async move {
                let result = match address {
                    Some(address) => match dialer.connect(&address).await {
                        Ok(mut c) => c.release(wpb::ReleaseRequest { epoch }).await.map(drop).map_err(|s| s.message().to_owned()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Ok(()),
                }
                .map_err(|message| ControlError::Release { worker: id.clone(), message });
                tracing::info!(worker = %id, ?result, "drained worker released");
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            });
        }
    }
}
