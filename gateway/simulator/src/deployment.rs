//! One simulated deployment's live state: quota, injected faults, counters.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::config::{DeploymentKind, DeploymentSpec};
use super::limiter::{Decision, LeakyBucket, Window};

/// Faults changeable at run time (`POST /sim/faults` or [`super::SimHandle::set_faults`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests (0..=1) answered with 500.
    pub error_rate: f64,
    /// Latency multiplier; 0 or 1 means normal speed.
    pub slowdown: f64,
    /// Streams pause after this many SSE events until the fault is cleared.
    pub stall_after_chunks: Option<u32>,
    /// Streams are broken off (the connection reset) after this many SSE events.
    pub cut_after_chunks: Option<u32>,
    /// Azure's own spillover (PTU): a request the quota rejects is served anyway, as by the
    /// standard deployment behind it, and marked `x-ms-is-spilled-over: true`.
    pub azure_spillover: bool,
    /// SSE lines end in CRLF instead of LF (as a proxy or an APIM policy on the way may
    /// re-frame them; the specification allows both, and CR alone).
    pub sse_crlf: bool,
    /// Answer requests with this response instead of serving them.
    pub respond_with: Option<ForcedResponse>,
    /// Headers added to every response (e.g. a `set-cookie` a front end in Azure adds).
    pub response_headers: Vec<(String, String)>,
}

/// A canned answer: e.g. 429 with `retry-after-ms: 3000` for the next 1 request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForcedResponse {
    pub status: u16,
    pub retry_after_ms: Option<u64>,
    pub retry_after_s: Option<u64>,
    /// Error code in the body (default: the status number).
    pub code: Option<String>,
    /// How many requests get it; `None` means every request until cleared.
    pub times: Option<u32>,
}

/// What a deployment really received and served.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStats {
    /// Requests that reached the deployment (after auth), whatever their outcome.
    pub requests: u64,
    /// Requests served with 200.
    pub succeeded: u64,
    /// 429s served by the quota.
    pub throttled: u64,
    /// 5xx served by the `error_rate` fault.
    pub failed: u64,
    /// Responses served by `respond_with`.
    pub forced: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub streams_started: u64,
    pub streams_completed: u64,
    /// Streams whose client went away before `[DONE]`.
    pub streams_cancelled: u64,
    /// Streams broken off by the `cut_after_chunks` fault.
    pub streams_cut: u64,
    /// Requests served by Azure's spillover (`azure_spillover`), and their tokens (also
    /// counted in `total_tokens`: this simulator serves them itself).
    pub spilled: u64,
    pub spilled_tokens: u64,
    /// Prompt tokens served from the prompt cache (also counted in `prompt_tokens`).
    pub cached_tokens: u64,
    /// Chat completions served with priority processing (`service_tier = "priority"`,
    /// prompt within the priority limit).
    pub priority: u64,
}

/// PAYG deployments count a sliding window; PTU ones fill a leaky bucket.
enum Quota {
    Window(Window),
    Bucket(LeakyBucket),
}

pub struct Deployment {
    pub spec: DeploymentSpec,
    quota: Mutex<Quota>,
    faults: watch::Sender<Faults>,
    stats: Mutex<DeploymentStats>,
    changed: watch::Sender<u64>,
    spill_next: std::sync::atomic::AtomicBool,
    /// Prompt prefixes this deployment has seen (their hashes): its prompt cache.
    prompt_cache: Mutex<std::collections::HashSet<u64>>,
}

/// Prompts shorter than this are not cached, and cache hits come in steps of this many.
const CACHE_MIN_TOKENS: u64 = 1_024;
const CACHE_STEP_TOKENS: u64 = 128;

impl Deployment {
    /// Prompt tokens served from this deployment's cache, as Azure counts them: a prefix of
    /// at least 1,024 tokens seen here before, in steps of 128. The prefix (`key`, `tokens`)
    /// is remembered for the next request.
    pub fn cached_prompt_tokens(&self, key: u64, tokens: u64) -> u64 {
        if tokens < CACHE_MIN_TOKENS {
            return 0;
        }
        let seen = !self
            .prompt_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        if seen {
            tokens / CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
        } else {
            0
        }
    }

    pub fn new(spec: DeploymentSpec, changed: watch::Sender<u64>) -> Self {
        let period = Duration::from_millis(spec.window_ms);
        let quota = match spec.kind {
            DeploymentKind::Payg => Quota::Window(Window::new(period, spec.tpm, spec.rpm_limit())),
            DeploymentKind::Ptu => Quota::Bucket(LeakyBucket::new(period, spec.tpm)),
        };
        Self {
            spec,
            quota: Mutex::new(quota),
            faults: watch::Sender::new(Faults::default()),
            stats: Mutex::new(DeploymentStats::default()),
            prompt_cache: Mutex::new(std::collections::HashSet::new()),
            changed,
            spill_next: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn record(&self, update: impl FnOnce(&mut DeploymentStats)) {
        update(&mut self.stats.lock().expect("sim stats lock"));
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn stats(&self) -> DeploymentStats {
        self.stats.lock().expect("sim stats lock").clone()
    }

    pub fn faults(&self) -> Faults {
        self.faults.borrow().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    pub fn watch_faults(&self) -> watch::Receiver<Faults> {
        self.faults.subscribe()
    }

    /// The forced response for this request, if any, counting down `times`.
    /// Serve the next charged request through Azure's spillover (a forced 429 turned into
    /// a spill by the `azure_spillover` fault).
    pub fn spill_next(&self) {
        self.spill_next
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn take_spill_next(&self) -> bool {
        self.spill_next
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn take_forced(&self) -> Option<ForcedResponse> {
        let mut taken = None;
        self.faults.send_if_modified(|f| {
            let Some(forced) = f.respond_with.as_mut() else {
                return false;
            };
            taken = Some(forced.clone());
            match forced.times.as_mut() {
                Some(0) => {
                    taken = None;
                    f.respond_with = None;
                    true
                }
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        f.respond_with = None;
                    }
                    true
                }
                None => false,
            }
        });
        taken
    }

    pub fn admit(&self, tokens: u64) -> Decision {
        match &mut *self.quota.lock().expect("sim quota lock") {
            Quota::Window(w) => w.try_admit(Instant::now(), tokens),
            Quota::Bucket(b) => b.try_admit(Instant::now(), tokens),
        }
    }

    pub fn utilization(&self) -> f64 {
        match &mut *self.quota.lock().expect("sim quota lock") {
            Quota::Window(w) => w.utilization(Instant::now()),
            Quota::Bucket(b) => b.utilization(Instant::now()),
        }
    }

    /// `base_ms` scaled by the slowdown fault and jittered.
    pub fn latency(&self, base_ms: u64) -> Duration {
        let slowdown = match self.faults.borrow().slowdown {
            s if s > 0.0 => s,
            _ => 1.0,
        };
        let jitter = self.spec.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64(base_ms as f64 / 1000.0 * slowdown * factor)
    }
}
