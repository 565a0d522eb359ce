//! Traffic classes at run time: which class a request has (its consumer's, lowered by the
//! request when it asks), which members it may use, and the line it stops at on a PTU.
//! The line itself is enforced by the fleet state, in the step that admits
//! ([`spillway_shared::Candidate::ceiling`]), so it holds fleet-wide.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName};

use crate::config::{BackendKind, ClassConfig, Overflow};
use crate::error::GatewayError;
use crate::routing_table::Member;

/// The request header that lowers a request's class.
pub const CLASS_HEADER: &str = "x-spillway-class";
const CLASS_HEADER_NAME: HeaderName = HeaderName::from_static(CLASS_HEADER);

/// One traffic class.
#[derive(Debug, PartialEq)]
pub struct Class {
    pub name: Arc<str>,
    pub rank: u32,
    /// The highest rank: keeps the PTU reserve.
    pub keeps_reserve: bool,
    pub overflow: Overflow,
    /// `overflow = "wait"`: the longest a request waits for its turn.
    pub max_wait: std::time::Duration,
    pub priority_tier: bool,
    /// `false`: shadow mode (its rules are counted, not applied).
    pub enforce: bool,
}

/// The configured classes, highest rank first.
#[derive(Debug)]
pub struct Classes {
    by_rank: Vec<Arc<Class>>,
}

impl Classes {
    /// From validated `[[classes]]` (non-empty, unique names).
    pub fn from_config(classes: &[ClassConfig]) -> Self {
        let top = classes.iter().map(|c| c.rank).max().unwrap_or(0);
        let mut by_rank: Vec<Arc<Class>> = classes
            .iter()
            .map(|c| {
                Arc::new(Class {
                    name: c.name.as_str().into(),
                    rank: c.rank,
                    keeps_reserve: c.rank == top,
                    overflow: c.overflow,
                    max_wait: std::time::Duration::from_millis(c.max_wait_ms),
                    priority_tier: c.priority_tier,
                    enforce: c.enforce,
                })
            })
            .collect();
        by_rank.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| a.name.cmp(&b.name)));
        Self { by_rank }
    }

    pub fn named(&self, name: &str) -> Option<&Arc<Class>> {
        self.by_rank.iter().find(|c| &*c.name == name)
    }

    /// A consumer without a class, and anonymous requests: the highest-ranked class.
    pub fn default_class(&self) -> &Arc<Class> {
        &self.by_rank[0]
    }

    /// What `service_tier = "flex"` (or `"batch"`) asks for: the lowest-ranked class.
    fn lowest(&self) -> &Arc<Class> {
        self.by_rank
            .last()
            .expect("classes are validated non-empty")
    }

    /// The request's class: its consumer's (`own`), lowered to the class the
    /// `x-spillway-class` header names, or to the lowest class when its body's
    /// `service_tier` says `flex`/`batch`. Naming an unknown class, or one ranked above
    /// its own, is the client's error (400): a request never raises its class.
    pub fn of_request(
        &self,
        own: Option<&str>,
        headers: &HeaderMap,
        service_tier: Option<&str>,
    ) -> Result<Arc<Class>, GatewayError> {
        let own = own
            .and_then(|name| self.named(name))
            .unwrap_or_else(|| self.default_class());
        let mut class = own;
        if matches!(service_tier, Some("flex" | "batch")) {
            class = lower(class, self.lowest());
        }
        if let Some(asked) = headers.get(CLASS_HEADER_NAME) {
            let asked = asked.to_str().unwrap_or("");
            let Some(named) = self.named(asked) else {
                return Err(GatewayError::BadRequest(format!(
                    "{CLASS_HEADER} names {asked:?}, which is not a traffic class here."
                )));
            };
            if named.rank > own.rank {
                return Err(GatewayError::BadRequest(format!(
                    "{CLASS_HEADER} names {:?}, above this key's class {:?}: a request may only lower its class.",
                    named.name, own.name
                )));
            }
            class = lower(class, named);
        }
        Ok(class.clone())
    }
}

/// The lower of two classes.
fn lower<'a>(a: &'a Arc<Class>, b: &'a Arc<Class>) -> &'a Arc<Class> {
    if b.rank < a.rank { b } else { a }
}

impl Class {
    /// Whether a member is this class's to use: priority members only for classes with
    /// `priority_tier`; with `overflow = "refuse"` (enforced), only PTU members when the
    /// pool has any (`pool_has_ptu`).
    pub fn may_use(&self, member: &Member, pool_has_ptu: bool) -> bool {
        match member.backend.kind {
            BackendKind::Priority if !self.priority_tier => false,
            BackendKind::Ptu => true,
            _ => !(self.stays_on_ptu() && pool_has_ptu),
        }
    }

    /// A lower class whose rule keeps it off PAYG.
    pub fn stays_on_ptu(&self) -> bool {
        self.enforce && !self.keeps_reserve && self.overflow != Overflow::Payg
    }

    /// A lower class that waits in the pool's queue for the PTU's room.
    pub fn waits(&self) -> bool {
        self.stays_on_ptu() && self.overflow == Overflow::Wait
    }

    /// This class's line on `member`: `tpm × (1 − reserve)` on a PTU member with a reserve,
    /// for a class below the top.
    pub fn ceiling(&self, member: &Member) -> Option<u64> {
        let backend = &member.backend;
        if self.keeps_reserve || backend.kind != BackendKind::Ptu || backend.reserve <= 0.0 {
            return None;
        }
        backend
            .tpm
            .map(|tpm| (tpm as f64 * (1.0 - backend.reserve)).floor() as u64)
    }

    /// A lower class in shadow mode: the line is checked first and the request served as
    /// the top class would be when it is crossed.
    pub fn shadowed(&self) -> bool {
        !self.enforce && !self.keeps_reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_classes;

    fn classes() -> Classes {
        let mut configs = default_classes();
        configs.push(ClassConfig {
            name: "backfill".into(),
            rank: 1,
            overflow: Overflow::Refuse,
            max_wait_ms: 1_000,
            priority_tier: false,
            enforce: true,
        });
        Classes::from_config(&configs)
    }

    fn headers(class: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CLASS_HEADER, class.parse().unwrap());
        h
    }

    #[test]
    fn a_request_lowers_its_class_and_never_raises_it() {
        let c = classes();
        let none = HeaderMap::new();
        assert_eq!(
            c.of_request(None, &none, None).unwrap().name.as_ref(),
            "interactive"
        );
        assert_eq!(
            c.of_request(None, &headers("batch"), None)
                .unwrap()
                .name
                .as_ref(),
            "batch"
        );
        assert_eq!(
            c.of_request(Some("interactive"), &none, Some("flex"))
                .unwrap()
                .name
                .as_ref(),
            "backfill"
        );
        assert_eq!(
            c.of_request(Some("batch"), &none, Some("priority"))
                .unwrap()
                .name
                .as_ref(),
            "batch",
            "service_tier never raises a class"
        );
        let raised = c
            .of_request(Some("batch"), &headers("interactive"), None)
            .unwrap_err();
        assert!(matches!(raised, GatewayError::BadRequest(m) if m.contains("only lower")));
        let unknown = c.of_request(None, &headers("vip"), None).unwrap_err();
        assert!(
            matches!(unknown, GatewayError::BadRequest(m) if m.contains("not a traffic class"))
        );
        // Header and service_tier together: the lower of the two.
        assert_eq!(
            c.of_request(None, &headers("batch"), Some("flex"))
                .unwrap()
                .name
                .as_ref(),
            "backfill"
        );
    }

    #[test]
    fn only_the_top_rank_keeps_the_reserve() {
        let c = classes();
        assert!(c.named("interactive").unwrap().keeps_reserve);
        assert!(!c.named("batch").unwrap().keeps_reserve);
        assert_eq!(c.default_class().name.as_ref(), "interactive");
    }
}
