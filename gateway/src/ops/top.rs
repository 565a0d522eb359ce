//! `spillway top`: the live fleet view an operator opens first during an incident. Every
//! second it reads the shared state (the same [`FleetReport`] as `spillway state`) and draws,
//! per pool, each member's tier, region, state (ok, or why it is held back and for how
//! long), a budget bar, utilization, time to first byte, throughput over the budget window,
//! and the pool's spillover share. `q`, Esc or Ctrl-C quits (SIGTERM too), always giving the
//! terminal back as it was.

use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use crate::ops::state_table::{FleetReport, MemberReport, PoolReport};

/// One screen: the report and when it was read.
pub struct TopView {
    pub report: FleetReport,
    pub read_at: String,
    /// Why the last read failed, if it did (the previous report stays on screen).
    pub error: Option<String>,
}

const BAR_CELLS: usize = 10;

/// Draw the view (pure: tested with ratatui's test backend).
pub fn draw(frame: &mut Frame, view: &TopView) {
    let report = &view.report;
    let header_lines =
        2 + u16::from(!report.replicas.is_empty()) + u16::from(report.cost_this_hour.is_some());
    let heights: Vec<Constraint> = std::iter::once(Constraint::Length(header_lines))
        .chain(
            report
                .pools
                .iter()
                .map(|p| Constraint::Length(p.members.len() as u16 + 3)),
        )
        .chain(std::iter::once(Constraint::Min(0)))
        .collect();
    let areas = Layout::vertical(heights).split(frame.area());
    let mut header = vec![Line::from(vec![
        Span::styled("spillway top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  state: {}  window {} s  read {}  (q, Esc or Ctrl-C quits)",
            report.store, report.budget_window_s, view.read_at
        )),
    ])];
    if let Some(distances) = report.distances() {
        header.push(Line::raw(distances));
    }
    if let Some(cost) = &report.cost_this_hour {
        header.push(Line::raw(cost.line()));
    }
    if let Some(error) = &view.error {
        header.push(Line::styled(
            format!("last read failed: {error}"),
            Style::new().fg(Color::Red),
        ));
    }
    frame.render_widget(Paragraph::new(header), areas[0]);
    for (pool, area) in report.pools.iter().zip(areas.iter().skip(1)) {
        frame.render_widget(pool_table(pool, report.budget_window_s), *area);
    }
}

fn pool_table(pool: &PoolReport, window_s: u64) -> Table<'static> {
    let title = format!(
        " pool {}  spillover {} of tokens this window ",
        pool.name,
        spillover(pool).map_or("-".into(), |s| format!("{:.0}%", s * 100.0))
    );
    let header = Row::new(
        [
            "backend",
            "tier",
            "region",
            "state",
            "budget",
            "util",
            "ttfb p50/p95",
            "tok/s",
            "req/s",
        ]
        .map(|h| Cell::from(h).style(Style::new().add_modifier(Modifier::BOLD))),
    );
    let rows = pool.members.iter().map(|m| member_row(m, window_s));
    Table::new(
        rows,
        [
            Constraint::Length(22),
            Constraint::Length(4),
            Constraint::Length(14),
            Constraint::Length(20),
            Constraint::Length(BAR_CELLS as u16 + 6),
            Constraint::Length(6),
            Constraint::Length(14),
            Constraint::Length(8),
            Constraint::Length(7),
        ],
    )
    .header(header)
    .block(Block::bordered().title(title))
}

fn member_row(m: &MemberReport, window_s: u64) -> Row<'static> {
    let (state, color) = match m.backoff_remaining_ms {
        None => ("ok".to_string(), Color::Green),
        Some(ms) => (
            format!("{} {:.1}s", m.state, ms as f64 / 1000.0),
            if m.state == "throttled" {
                Color::Yellow
            } else {
                Color::Red
            },
        ),
    };
    let per_second = |n: u64| format!("{:.1}", n as f64 / window_s.max(1) as f64);
    Row::new(vec![
        Cell::from(m.backend.clone()),
        Cell::from(m.tier.to_string()),
        Cell::from(m.region.clone().unwrap_or_else(|| "-".into())),
        Cell::from(state).style(Style::new().fg(color)),
        Cell::from(budget_bar(m.tokens_used, m.tokens_budget)),
        Cell::from(
            m.utilization
                .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
        ),
        // Upper bounds of histogram buckets, as in `spillway state`.
        Cell::from(match (m.ttfb_p50_ms, m.ttfb_p95_ms) {
            (Some(p50), Some(p95)) => format!("≤{p50}/≤{p95} ms"),
            _ => "-".into(),
        }),
        Cell::from(per_second(m.tokens_used)),
        Cell::from(per_second(m.requests_used)),
    ])
}

/// `█████░░░░░ 52%` of the window's token budget; `-` without one.
pub fn budget_bar(used: u64, budget: Option<u64>) -> String {
    let Some(budget) = budget.filter(|&b| b > 0) else {
        return format!("{used} tok");
    };
    let share = used as f64 / budget as f64;
    let filled = ((share * BAR_CELLS as f64).round() as usize).min(BAR_CELLS);
    format!(
        "{}{} {:>3.0}%",
        "█".repeat(filled),
        "░".repeat(BAR_CELLS - filled),
        share * 100.0
    )
}

/// Tokens served this window by members beyond the pool's first tier, as a share.
pub fn spillover(pool: &PoolReport) -> Option<f64> {
    let first = pool.members.iter().map(|m| m.tier).min()?;
    let total: u64 = pool.members.iter().map(|m| m.tokens_used).sum();
    let spilled: u64 = pool
        .members
        .iter()
        .filter(|m| m.tier > first)
        .map(|m| m.tokens_used)
        .sum();
    (total > 0).then(|| spilled as f64 / total as f64)
}

/// Run the live view until `q`, Esc or Ctrl-C, or SIGTERM/SIGINT/SIGHUP; `connecting` names
/// the store while the first read is under way. The terminal is restored on every way out
/// (a panic too: ratatui's hook), and a missing or sizeless terminal is a clear error.
pub async fn run<F, Fut>(mut read: F, every: Duration, connecting: &str) -> std::io::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<FleetReport, String>>,
{
    use std::io::IsTerminal;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(std::io::Error::other(
            "spillway top draws on a terminal, and this is not one: use `spillway state` (or `spillway state --json`) instead",
        ));
    }
    let (columns, rows) = ratatui::crossterm::terminal::size()?;
    if columns == 0 || rows == 0 {
        return Err(std::io::Error::other(format!(
            "the terminal has no size ({columns}x{rows}): set one (`stty cols 120 rows 40`) or use `spillway state`"
        )));
    }
    // A signal only sets the flag: the loop below notices it within a tenth of a second and
    // leaves through the same door as `q`, which restores the terminal.
    let stop = Arc::new(AtomicBool::new(false));
    let signals = tokio::spawn(stop_on_signals(stop.clone()));
    let mut screen = Screen(ratatui::try_init()?);
    let result = async {
        screen.0.draw(|frame| {
            let text =
                format!("spillway top: connecting to {connecting}…  (q, Esc or Ctrl-C quits)");
            frame.render_widget(Paragraph::new(text), frame.area());
        })?;
        let mut view: Option<TopView> = None;
        loop {
            let read_at = time::OffsetDateTime::now_utc()
                .format(&time::macros::format_description!(
                    "[hour]:[minute]:[second]"
                ))
                .unwrap_or_default();
            match read().await {
                Ok(report) => {
                    view = Some(TopView {
                        report,
                        read_at,
                        error: None,
                    })
                }
                Err(e) => match &mut view {
                    Some(v) => v.error = Some(e),
                    None => return Err(std::io::Error::other(e)),
                },
            }
            if let Some(view) = &view {
                screen.0.draw(|frame| draw(frame, view))?;
            }
            if wait_for_quit(every, &stop)? {
                return Ok(());
            }
        }
    }
    .await;
    signals.abort();
    drop(screen);
    result
}

/// The terminal in raw mode on the alternate screen, given back (cursor shown, raw mode
/// off, main screen) when dropped, whichever way `run` ends.
struct Screen(ratatui::DefaultTerminal);

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.0.show_cursor();
        ratatui::restore();
    }
}

/// Wait up to `every` for a quitting key (`q`, Esc, Ctrl-C: raw mode turns Ctrl-C into a
/// key) or a stop signal; true to quit.
fn wait_for_quit(every: Duration, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<bool> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let slice = Duration::from_millis(100);
    let deadline = std::time::Instant::now() + every;
    tokio::task::block_in_place(|| {
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            if event::poll(left.min(slice))?
                && let Event::Key(key) = event::read()?
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(true);
                }
            }
        }
    })
}

/// Set `stop` on SIGTERM, SIGINT or SIGHUP (a closed terminal).
async fn stop_on_signals(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::ops::state_table::ReplicaReport;

    fn member(backend: &str, tier: u32, tokens: u64, backoff: Option<(&str, u64)>) -> MemberReport {
        MemberReport {
            backend: backend.into(),
            deployment: "gpt-4o".into(),
            tier,
            region: Some("eastus".into()),
            state: backoff.map_or("ok".into(), |(why, _)| why.into()),
            backoff_remaining_ms: backoff.map(|(_, ms)| ms),
            tokens_used: tokens,
            tokens_budget: (tier == 1).then_some(1_000),
            requests_used: 30,
            requests_budget: None,
            ttfb_p50_ms: Some(120),
            ttfb_p95_ms: Some(480),
            total_p50_ms: None,
            total_p95_ms: None,
            utilization: (tier == 1).then_some(0.87),
            remaining_tokens: None,
            estimated_tokens: 0,
            actual_tokens: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
        }
    }

    fn screen(view: &TopView) -> String {
        let mut terminal = Terminal::new(TestBackend::new(130, 16)).unwrap();
        terminal.draw(|frame| draw(frame, view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_view_shows_each_member_its_state_budget_and_the_spillover() {
        let view = TopView {
            report: FleetReport {
                store: "redis".into(),
                budget_window_s: 60,
                replicas: vec![
                    ReplicaReport {
                        replica: "a".into(),
                        round_trip_ms: 0.4,
                    },
                    ReplicaReport {
                        replica: "b".into(),
                        round_trip_ms: 84.1,
                    },
                ],
                cost_this_hour: None,
                pools: vec![PoolReport {
                    name: "gpt-4o".into(),
                    members: vec![
                        member("ptu-eastus", 1, 520, None),
                        member("ptu-westus", 1, 0, Some(("throttled", 4_200))),
                        member("payg-eastus", 2, 480, None),
                    ],
                }],
            },
            read_at: "12:00:00".into(),
            error: None,
        };
        let text = screen(&view);
        for expected in [
            "spillway top",
            "state: redis",
            "pool gpt-4o",
            "spillover 48% of tokens",
            "ptu-eastus",
            "█████░░░░░  52%",
            "87%",
            "≤120/≤480 ms",
            "throttled 4.2s",
            "payg-eastus",
            "480 tok",
            "8.0",
            "2 replicas, round trip to Redis 0.4 / 84.1 ms",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} not on screen:\n{text}"
            );
        }
        let rows: Vec<&str> = text.lines().collect();
        let ptu = rows.iter().position(|l| l.contains("ptu-eastus")).unwrap();
        let payg = rows.iter().position(|l| l.contains("payg-eastus")).unwrap();
        assert!(ptu < payg, "members in preference order");
    }

    #[test]
    fn a_failed_read_keeps_the_last_report_and_says_why() {
        let view = TopView {
            report: FleetReport {
                store: "redis".into(),
                budget_window_s: 60,
                replicas: vec![],
                pools: vec![],
                cost_this_hour: Some(crate::ops::state_table::CostSummary {
                    total_usd: 12.5,
                    by_class_usd: vec![("batch".into(), 2.5), ("interactive".into(), 10.0)],
                    saved_by_ptu_usd: 3.0,
                }),
            },
            read_at: "12:00:01".into(),
            error: Some("Redis unavailable".into()),
        };
        let screen = screen(&view);
        assert!(screen.contains("last read failed: Redis unavailable"));
        assert!(
            screen.contains(
                "cost this hour $12.50 (batch $2.50, interactive $10.00), saved by PTU $3.00"
            ),
            "{screen}"
        );
    }

    #[test]
    fn budget_bars_and_spillover_shares() {
        assert_eq!(budget_bar(0, Some(100)), "░░░░░░░░░░   0%");
        assert_eq!(budget_bar(250, Some(100)), "██████████ 250%");
        assert_eq!(budget_bar(7, None), "7 tok");
        let pool = PoolReport {
            name: "p".into(),
            members: vec![member("a", 1, 0, None)],
        };
        assert_eq!(spillover(&pool), None, "nothing served yet");
    }
}
