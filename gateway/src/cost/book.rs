//! The replica's open page of the cost ledger: answers add their tokens here (a map update,
//! no store call), and the page goes to the fleet state once a second, one call per hour.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_shared::FleetState;
use spillway_shared::ledger::{HOUR_MS, SpendCounts, SpendKey, hour_of};

use crate::ops::metrics::AnswerLabels;

/// How often the page is written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The page: by hour, the answer's labels (shared names, cloned cheaply) and its tier;
/// turned into ledger lines only when written. Hashed with foldhash: the keys are the
/// configuration's names, and SipHash's flooding resistance buys nothing here.
type Page = HashMap<(u64, AnswerLabels, &'static str), SpendCounts, foldhash::fast::RandomState>;

pub struct SpendBook {
    fleet: Arc<dyn FleetState>,
    /// How long the ledger keeps an hour.
    retention: Duration,
    page: Mutex<Page>,
    flusher: OnceLock<()>,
}

impl SpendBook {
    pub fn new(fleet: Arc<dyn FleetState>, retention: Duration) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            retention,
            page: Mutex::new(Page::default()),
            flusher: OnceLock::new(),
        })
    }

    /// Count an answer's tokens in this hour (written within a second), at `tier`.
    pub fn add(self: &Arc<Self>, labels: &AnswerLabels, tier: &'static str, counts: SpendCounts) {
        let key = (hour_of(unix_ms()), labels.clone(), tier);
        self.page
            .lock()
            .expect("spend book lock")
            .entry(key)
            .or_default()
            .add(counts);
        self.flusher.get_or_init(|| {
            tokio::spawn(flush_every_second(Arc::downgrade(self)));
        });
    }

    /// Write what the page holds now.
    pub async fn flush(&self) {
        let page = std::mem::take(&mut *self.page.lock().expect("spend book lock"));
        write(&*self.fleet, page, self.retention).await;
    }
}

impl Drop for SpendBook {
    /// A replaced configuration's book: its last page is written in the background.
    fn drop(&mut self) {
        let page = std::mem::take(self.page.get_mut().expect("spend book lock"));
        if page.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (fleet, retention) = (self.fleet.clone(), self.retention);
        tokio::spawn(async move { write(&*fleet, page, retention).await });
    }
}

async fn flush_every_second(book: Weak<SpendBook>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(book) = book.upgrade() else { return };
        book.flush().await;
    }
}

/// One `record_spend` per hour on the page.
async fn write(fleet: &dyn FleetState, page: Page, retention: Duration) {
    let mut hours: HashMap<u64, Vec<(SpendKey, SpendCounts)>> = HashMap::new();
    for ((hour, labels, tier), counts) in page {
        let key = SpendKey {
            pool: labels.pool.to_string(),
            class: labels.class.to_string(),
            backend: labels.backend.to_string(),
            tier: tier.to_owned(),
            consumer: labels.consumer.unwrap_or_default(),
        };
        hours.entry(hour).or_default().push((key, counts));
    }
    for (hour, lines) in hours {
        let expires = hour + HOUR_MS + retention.as_millis() as u64;
        if let Err(e) = fleet.record_spend(hour, expires, &lines).await {
            tracing::warn!(error = %e, lines = lines.len(), "cost ledger lines not written");
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
