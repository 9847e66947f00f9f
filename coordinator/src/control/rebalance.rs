//! Redundant experts placed again from the observed load (`--redundant-experts`): every
//! `--rebalance-secs` the leader places each expert-parallel Mixtral replica's copies from
//! the load it ran since, and changes them in place (an epoch change) when that pays.

use std::time::{Duration, Instant};

use cluster::experts::{place_copies, projected_imbalance};

use super::Controller;

impl Controller {
    /// Every `--rebalance-secs`, places each expert-parallel Mixtral replica's redundant
    /// experts again from the load it observed since the last time, and changes them (in
    /// place, as an epoch change) when that projects a lower imbalance by more than 2 %.
    pub(super) fn rebalance(&mut self) {
        let n = self.cfg.sizing.redundant_experts;
        let every = Duration::from_secs(self.cfg.sizing.rebalance_secs);
        if n == 0 || self.placing.is_some() || self.releading || self.last_rebalance.elapsed() < every {
            return;
        }
        self.last_rebalance = Instant::now();
        let mut changed = false;
        for r in self.live.iter().filter(|r| r.plan.layout.ep > 1 && r.handle.is_alive()) {
            let now = r.handle.expert_load();
            let window = self.observed.get(&r.handle.id).map_or_else(|| now.clone(), |then| now.since(then));
            self.observed.insert(r.handle.id, now);
            let copies = place_copies(&window, n);
            let (Some(new), Some(old)) = (projected_imbalance(&window, &copies), projected_imbalance(&window, &r.plan.copies)) else { continue };
            if copies != r.plan.copies && new < old * 0.98 {
                tracing::info!(replica = r.handle.id, observed = %format!("{:.3}", window.imbalance().unwrap_or(1.0)), with_copies = %format!("{new:.3}"), "placing redundant experts again");
                self.rebalanced.insert(r.handle.id, copies);
                changed = true;
            }
        }
        self.observed.retain(|id, _| self.live.iter().any(|r| r.handle.id == *id));
        if changed {
            self.reconcile();
        }
    }
}
