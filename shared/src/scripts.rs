//! The Lua scripts and their argument records. A script's ARGV is a sequence of records;
//! each record is a struct here with named fields in ARGV order, and the script's header
//! names the same fields in the same order (`local RECEIPT = fields{'bucket_ms', ...}`), then
//! reads them by name (`receipt.bucket_ms`). `tests::every_record_matches_its_script` fails
//! when the two disagree on a record's length or order. Every script is loaded with
//! `lua/preamble.lua` (reading records, the clock) in front of it.

use fred::types::scripts::Script;

/// How a value is written as a script argument.
pub(crate) trait Arg {
    fn arg(&self) -> String;
}

impl Arg for u64 {
    fn arg(&self) -> String {
        self.to_string()
    }
}

impl Arg for u32 {
    fn arg(&self) -> String {
        self.to_string()
    }
}

impl Arg for f64 {
    fn arg(&self) -> String {
        self.to_string()
    }
}

impl Arg for String {
    fn arg(&self) -> String {
        self.clone()
    }
}

/// `None` is the empty string (the scripts' "none").
impl<T: Arg> Arg for Option<T> {
    fn arg(&self) -> String {
        self.as_ref().map(Arg::arg).unwrap_or_default()
    }
}

/// A limit: a number, or -1 for none.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limit<T>(pub Option<T>);

impl<T: Arg> Arg for Limit<T> {
    fn arg(&self) -> String {
        self.0.as_ref().map_or_else(|| "-1".into(), Arg::arg)
    }
}

/// Declares the records: each struct, its field names in order, and which script's header
/// names them (`LUA`, in `FILE`).
macro_rules! records {
    ($(
        $(#[$doc:meta])*
        $name:ident = $lua:literal in $file:literal {
            $( $(#[$field_doc:meta])* $field:ident: $ty:ty, )*
        }
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Debug, Default)]
            pub(crate) struct $name {
                $( $(#[$field_doc])* pub $field: $ty, )*
            }

            impl $name {
                /// Field names, in ARGV order.
                #[allow(dead_code)]
                pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

                /// Append the record's arguments, in order.
                #[allow(dead_code)]
                pub fn push_to(&self, args: &mut Vec<String>) {
                    $( args.push(Arg::arg(&self.$field)); )*
                }

                #[allow(dead_code)]
                pub fn to_args(&self) -> Vec<String> {
                    let mut args = Vec::with_capacity(Self::FIELDS.len());
                    self.push_to(&mut args);
                    args
                }
            }
        )*

        /// (script file, record name in its header, field names) of every record.
        #[cfg(test)]
        const ALL_RECORDS: &[(&str, &str, &[&str])] = &[$( ($file, $lua, $name::FIELDS) ),*];
    };
}

records! {
    /// `acquire.lua`: the request, before its candidates.
    AcquireArgs = "ACQUIRE" in "acquire.lua" {
        /// Estimated tokens of the request.
        estimate: u64,
        /// Budget bucket and window lengths, ms.
        bucket_ms: u64,
        window_ms: u64,
        /// "" for Redis TIME; a pinned time in ms only in tests.
        clock: String,
        /// How long an upstream's capacity hints stay trusted, ms.
        hint_ttl_ms: u64,
        /// After a breaker cool-down, the others are held back this long while one probes.
        probe_ms: u64,
        /// The reservation's id ("" none); an id already released admits nothing.
        reservation_id: String,
    }

    /// `acquire.lua`: one candidate, in preference order.
    CandidateArgs = "CANDIDATE" in "acquire.lua" {
        tokens_per_window: Limit<u64>,
        requests_per_window: Limit<u64>,
        /// The utilization (share) above which it is skipped.
        spill_utilization: Limit<f64>,
        /// A lower class's line: admitted only while the window's tokens stay at or below.
        ceiling: Limit<u64>,
    }

    /// `acquire.lua`: after the candidates, the lease the replica would like.
    LeaseArgs = "LEASE" in "acquire.lua" {
        /// How many requests like this one the replica would like to admit on its own.
        wanted: u64,
    }

    /// `acquire.lua`: with the queue keys, the request's ticket.
    QueueArgs = "QUEUE" in "acquire.lua" {
        ticket: String,
        /// How long the ticket holds its place unless asked again, ms.
        alive_ms: u64,
    }

    /// `spend.lua`: the hour's expiry, before its entries.
    SpendArgs = "SPEND" in "spend.lua" {
        /// When the hour is forgotten: unix time, ms.
        expires_at_ms: u64,
    }

    /// `spend.lua`: one ledger line and what to add to it.
    SpendEntry = "ENTRY" in "spend.lua" {
        /// `<pool>|<class>|<backend>|<tier>|<consumer>`.
        line: String,
        input: u64,
        cached: u64,
        output: u64,
        requests: u64,
    }

    /// `leave.lua`.
    LeaveArgs = "LEAVE" in "leave.lua" {
        ticket: String,
    }

    /// `settle.lua`: one receipt (kind "r"): what became of one admitted request, or a
    /// backoff, or hints alone.
    ReceiptRecord = "RECEIPT" in "settle.lua" {
        /// The reservation's bucket start ("" when settling no reservation).
        bucket_ms: Option<u64>,
        reserved: Option<u64>,
        used: Option<u64>,
        /// Histogram labels (`le_<bound>`), "" to record none.
        ttfb_label: String,
        total_label: String,
        per_token_label: String,
        /// x-ratelimit-remaining-tokens and the utilization share ("" none).
        remaining_tokens: Option<u64>,
        utilization: Option<f64>,
        /// A backoff: its length ("" none) and reason.
        backoff_ms: Option<u64>,
        backoff_reason: String,
        slot_ms: u64,
        latency_window_ms: u64,
        clock: String,
        /// Consecutive failures that open the breaker (0: a plain backoff, no breaker).
        breaker_failures: u32,
        breaker_max_ms: u64,
        /// The failure share that also opens it, with at least `breaker_min_outcomes`
        /// outcomes within `breaker_window_ms`.
        breaker_failure_rate: f64,
        breaker_min_outcomes: u32,
        breaker_window_ms: u64,
        /// The reservation's ledger mark ("" none): remaining_tokens is stored less the tokens
        /// admitted after this request, which the upstream had not seen.
        ledger_mark: Option<u64>,
        /// When the request was admitted, ms ("" now): the breaker epoch.
        admitted_ms: Option<u64>,
        /// How long ago the hints were observed, ms.
        hints_age_ms: u64,
        /// The reservation's id ("" none): corrected only while open, so a settle applies once.
        reservation_id: String,
        output_tokens_label: String,
        /// Prompt tokens the answer reported, and how many its prompt cache served.
        prompt_tokens: u64,
        cached_tokens: u64,
    }

    /// `settle.lua`: the sum of a member's completed requests on a lease (kind "a").
    SumRecord = "SUM" in "settle.lua" {
        /// "<bucket>=<used - reserved>,..."
        corrections: String,
        /// "<metric>:le_<bound>=<n>,..."
        histogram: String,
        completed: u64,
        estimated: u64,
        actual: u64,
        successes: u64,
        /// Latest admission time among them, ms (the breaker epoch).
        admitted_ms: u64,
        remaining_tokens: Option<u64>,
        utilization: Option<f64>,
        ledger_mark: u64,
        hints_age_ms: u64,
        slot_ms: u64,
        latency_window_ms: u64,
        clock: String,
        breaker_window_ms: u64,
        prompt_tokens: u64,
        cached_tokens: u64,
    }

    /// `snapshot.lua`.
    SnapshotArgs = "SNAPSHOT" in "snapshot.lua" {
        bucket_ms: u64,
        window_ms: u64,
        slot_ms: u64,
        latency_window_ms: u64,
        clock: String,
    }

    /// `heartbeat.lua`.
    HeartbeatArgs = "HEARTBEAT" in "heartbeat.lua" {
        replica: String,
        /// A replica counts as live this long after its last heartbeat, ms.
        ttl_ms: u64,
        /// This replica's typical round trip to Redis, µs (`None`: not measured yet).
        round_trip_us: Option<u64>,
        clock: String,
    }

    /// `charge.lua`.
    ChargeArgs = "CHARGE" in "charge.lua" {
        tokens: u64,
        requests: u64,
        bucket_ms: u64,
        window_ms: u64,
        clock: String,
    }

    /// `restore.lua`: the claim, before the members' usage.
    RestoreArgs = "RESTORE" in "restore.lua" {
        /// The value the pool's generation marker is set to when it is missing.
        generation: String,
        bucket_ms: u64,
        window_ms: u64,
        clock: String,
    }

    /// `restore.lua`: one member's usage to put back.
    UsageArgs = "USAGE" in "restore.lua" {
        tokens: u64,
        requests: u64,
    }

    /// `release.lua`.
    ReleaseArgs = "RELEASE" in "release.lua" {
        reservation_id: String,
        /// How long the released mark is kept, ms.
        ttl_ms: u64,
        /// "<tokens>|<requests>": give back only this much (a lease's unused part); "" all.
        part: String,
    }

    /// `pin_response.lua`.
    PinArgs = "PIN" in "pin_response.lua" {
        pool: String,
        backend: String,
        ttl_ms: u64,
        /// The creator's tag ("" when the gateway authenticates no one).
        consumer: String,
    }

    /// `spend_quota.lua`.
    QuotaArgs = "QUOTA" in "spend_quota.lua" {
        /// Tokens to add (0 reads the counter).
        tokens: u64,
        /// When the counter is forgotten: unix time, ms.
        expires_at_ms: u64,
    }
}

/// `settle.lua`'s record kinds, written before each record.
pub(crate) const RECEIPT_KIND: &str = "r";
pub(crate) const SUM_KIND: &str = "a";

const PREAMBLE: &str = include_str!("lua/preamble.lua");

/// Every script, each with the preamble in front.
#[derive(Clone)]
pub(crate) struct Scripts {
    pub acquire: Script,
    pub settle: Script,
    pub snapshot: Script,
    pub heartbeat: Script,
    pub charge: Script,
    pub restore: Script,
    pub release: Script,
    pub pin_response: Script,
    pub spend_quota: Script,
    pub leave: Script,
    pub spend: Script,
}

impl Scripts {
    pub fn load() -> Self {
        // A `#!lua flags=...` line must stay the first (read-only scripts declare
        // `no-writes`, so they run while writes are paused, as in a failover).
        let script = |body: &str| match body.strip_prefix("#!") {
            Some(rest) => {
                let (flags, body) = rest.split_once('\n').unwrap_or((rest, ""));
                Script::from_lua(format!("#!{flags}\n{PREAMBLE}{body}"))
            }
            None => Script::from_lua(format!("{PREAMBLE}{body}")),
        };
        Self {
            acquire: script(include_str!("lua/acquire.lua")),
            settle: script(include_str!("lua/settle.lua")),
            snapshot: script(include_str!("lua/snapshot.lua")),
            heartbeat: script(include_str!("lua/heartbeat.lua")),
            charge: script(include_str!("lua/charge.lua")),
            restore: script(include_str!("lua/restore.lua")),
            release: script(include_str!("lua/release.lua")),
            pin_response: script(include_str!("lua/pin_response.lua")),
            spend_quota: script(include_str!("lua/spend_quota.lua")),
            leave: script(include_str!("lua/leave.lua")),
            spend: script(include_str!("lua/spend.lua")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ALL_RECORDS;

    fn source(file: &str) -> &'static str {
        match file {
            "acquire.lua" => include_str!("lua/acquire.lua"),
            "settle.lua" => include_str!("lua/settle.lua"),
            "snapshot.lua" => include_str!("lua/snapshot.lua"),
            "heartbeat.lua" => include_str!("lua/heartbeat.lua"),
            "charge.lua" => include_str!("lua/charge.lua"),
            "restore.lua" => include_str!("lua/restore.lua"),
            "release.lua" => include_str!("lua/release.lua"),
            "pin_response.lua" => include_str!("lua/pin_response.lua"),
            "spend_quota.lua" => include_str!("lua/spend_quota.lua"),
            "leave.lua" => include_str!("lua/leave.lua"),
            "spend.lua" => include_str!("lua/spend.lua"),
            other => panic!("no script {other}"),
        }
    }

    /// The names in `local NAME = fields{'a', 'b', ...}` of a script's header.
    fn lua_fields(source: &str, name: &str) -> Option<Vec<String>> {
        let start = source.find(&format!("local {name} = fields{{"))?;
        let rest = &source[start..];
        let list = &rest[rest.find('{')? + 1..rest.find('}')?];
        Some(
            list.split(',')
                .map(|s| s.trim().trim_matches('\'').to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }

    #[test]
    fn every_record_matches_its_script() {
        for (file, name, fields) in ALL_RECORDS {
            let lua = lua_fields(source(file), name)
                .unwrap_or_else(|| panic!("{file} declares no `local {name} = fields{{...}}`"));
            assert_eq!(&lua, fields, "{file}'s {name} and scripts.rs disagree");
        }
    }

    #[test]
    fn a_record_the_script_does_not_match_is_found() {
        let lua = "local R = fields{'a', 'b'}";
        assert_eq!(lua_fields(lua, "R").unwrap(), ["a", "b"]);
        assert_ne!(lua_fields(lua, "R").unwrap(), ["b", "a"]);
        assert!(lua_fields(lua, "S").is_none());
    }

    /// Every script reads ARGV through its records only (the count checks excepted).
    #[test]
    fn scripts_read_no_argument_by_position() {
        for (file, _, _) in ALL_RECORDS {
            let positional = source(file)
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .filter(|l| l.contains("ARGV[") && !l.contains("ARGV[p]"))
                .collect::<Vec<_>>();
            assert!(positional.is_empty(), "{file}: {positional:?}");
        }
    }
}
