//! Prometheus metrics, named in the style of vLLM's (`tramontane:` prefix). Counters and
//! histograms are updated by the frontend (per request) and the replicas (per step); gauges
//! are read from the replicas when scraped.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Sequences-per-step buckets.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count);
    }
}

/// Why requests ended, for `request_success_total` / failures.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Length,
    Stop,
    Aborted,
    Failed,
}

pub struct Metrics {
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    e2e: Mutex<Histogram>,
    queue: Mutex<Histogram>,
    batch: Mutex<Histogram>,
    outcomes: [AtomicU64; 4],
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// Microseconds: whole steps as the coordinator saw them (plan to delivery), and the
    /// workers' compute inside them; new tokens processed by those steps.
    step_micros: AtomicU64,
    worker_compute_micros: AtomicU64,
    step_tokens: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ttft: Mutex::new(Histogram::new(&LATENCY_BUCKETS)),
            itl: Mutex::new(Histogram::new(&LATENCY_BUCKETS)),
            e2e: Mutex::new(Histogram::new(&LATENCY_BUCKETS)),
            queue: Mutex::new(Histogram::new(&LATENCY_BUCKETS)),
            batch: Mutex::new(Histogram::new(&BATCH_BUCKETS)),
            outcomes: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            step_micros: AtomicU64::new(0),
            worker_compute_micros: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
        }
    }
}

fn observe(h: &Mutex<Histogram>, v: f64) {
    h.lock().unwrap_or_else(|p| p.into_inner()).observe(v);
}

/// Figures read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub running: usize,
    pub waiting: usize,
    pub used_blocks: usize,
    pub num_blocks: usize,
}

impl Metrics {
    pub fn time_to_first_token(&self, s: f64) {
        observe(&self.ttft, s);
    }
    pub fn inter_token_latency(&self, s: f64) {
        observe(&self.itl, s);
    }
    pub fn queue_time(&self, s: f64) {
        observe(&self.queue, s);
    }
    /// Sequences in one executed step.
    pub fn batch_size(&self, n: usize) {
        observe(&self.batch, n as f64);
    }
    /// One executed step: its wall time at the coordinator, the worker's compute time, and
    /// the new tokens it processed.
    pub fn step(&self, wall: std::time::Duration, compute_micros: u64, tokens: usize) {
        self.step_micros.fetch_add(wall.as_micros() as u64, Ordering::Relaxed);
        self.worker_compute_micros.fetch_add(compute_micros, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub fn finished(&self, outcome: Outcome, e2e_seconds: f64, prompt_tokens: usize, generated: usize) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        observe(&self.e2e, e2e_seconds);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens.fetch_add(generated as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "tramontane:num_requests_running", "Sequences in running batches.", g.running as f64);
        gauge(&mut out, "tramontane:num_requests_waiting", "Requests waiting to be scheduled.", g.waiting as f64);
        gauge(&mut out, "tramontane:kv_cache_usage_blocks", "KV cache blocks in use.", g.used_blocks as f64);
        gauge(&mut out, "tramontane:kv_cache_total_blocks", "KV cache blocks in all.", g.num_blocks as f64);
        let usage = if g.num_blocks == 0 { 0.0 } else { g.used_blocks as f64 / g.num_blocks as f64 };
        gauge(&mut out, "tramontane:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", usage);
        let _ = writeln!(out, "# HELP tramontane:request_success_total Finished requests by reason.\n# TYPE tramontane:request_success_total counter");
        for (reason, i) in [("length", Outcome::Length), ("stop", Outcome::Stop), ("abort", Outcome::Aborted)] {
            let _ = writeln!(out, "tramontane:request_success_total{{finished_reason=\"{reason}\"}} {}", self.outcomes[i as usize].load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP tramontane:request_failure_total Requests that failed.\n# TYPE tramontane:request_failure_total counter\ntramontane:request_failure_total {}",
            self.outcomes[Outcome::Failed as usize].load(Ordering::Relaxed)
        );
        for (name, help, v) in [
            ("tramontane:prompt_tokens_total", "Prompt tokens of finished requests.", &self.prompt_tokens),
            ("tramontane:generation_tokens_total", "Tokens generated by finished requests.", &self.generation_tokens),
            ("tramontane:step_micros_total", "Wall time of executed steps at the coordinator (plan to delivery).", &self.step_micros),
            ("tramontane:worker_compute_micros_total", "Worker compute time inside those steps.", &self.worker_compute_micros),
            ("tramontane:step_tokens_total", "New tokens (prompt chunks and decodes) those steps processed.", &self.step_tokens),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        for (h, name, help) in [
            (&self.ttft, "tramontane:time_to_first_token_seconds", "Time from arrival to the first token."),
            (&self.itl, "tramontane:inter_token_latency_seconds", "Time between consecutive tokens of a request."),
            (&self.e2e, "tramontane:e2e_request_latency_seconds", "Time from arrival to the last token."),
            (&self.queue, "tramontane:request_queue_time_seconds", "Time from arrival to the first scheduled step."),
            (&self.batch, "tramontane:batch_size", "Sequences per executed step."),
        ] {
            h.lock().unwrap_or_else(|p| p.into_inner()).render(&mut out, name, help);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render() {
        let m = Metrics::default();
        m.batch_size(3);
        m.batch_size(20);
        m.finished(Outcome::Length, 0.5, 4, 8);
        let text = m.render(Gauges { running: 2, waiting: 1, used_blocks: 5, num_blocks: 10 });
        assert!(text.contains("tramontane:batch_size_bucket{le=\"4\"} 1"), "{text}");
        assert!(text.contains("tramontane:batch_size_bucket{le=\"32\"} 2"));
        assert!(text.contains("tramontane:batch_size_count 2"));
        assert!(text.contains("tramontane:kv_cache_usage_perc 0.5"));
        assert!(text.contains("tramontane:request_success_total{finished_reason=\"length\"} 1"));
        assert!(text.contains("tramontane:generation_tokens_total 8"));
    }
}
