//! The periods of a consumer's long token quota: calendar hours, days, ISO weeks (from
//! Monday) and months, in UTC, so every replica agrees on when a period starts and ends.

use serde::{Deserialize, Serialize};
use time::{Date, Duration, Month, OffsetDateTime, Time, Weekday};

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Hourly,
    Daily,
    Weekly,
    #[default]
    Monthly,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hourly => "hourly",
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
        }
    }

    /// The word for a period in messages ("per day").
    pub fn unit(self) -> &'static str {
        match self {
            Self::Hourly => "hour",
            Self::Daily => "day",
            Self::Weekly => "week",
            Self::Monthly => "month",
        }
    }

    /// The period holding `now`: its start and its end (the next period's start).
    pub fn span(self, now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
        let now = now.to_offset(time::UtcOffset::UTC);
        let midnight = |date: Date| date.with_time(Time::MIDNIGHT).assume_utc();
        match self {
            Self::Hourly => {
                let start = now.replace_time(Time::from_hms(now.hour(), 0, 0).expect("valid"));
                (start, start + Duration::HOUR)
            }
            Self::Daily => {
                let start = midnight(now.date());
                (start, start + Duration::DAY)
            }
            Self::Weekly => {
                let back = now.weekday().number_days_from_monday();
                let start = midnight(now.date()) - Duration::days(i64::from(back));
                debug_assert_eq!(start.weekday(), Weekday::Monday);
                (start, start + Duration::WEEK)
            }
            Self::Monthly => {
                let first = |year: i32, month: Month| {
                    midnight(Date::from_calendar_date(year, month, 1).expect("valid"))
                };
                let start = first(now.year(), now.month());
                let end = match now.month() {
                    Month::December => first(now.year() + 1, Month::January),
                    month => first(now.year(), month.next()),
                };
                (start, end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn periods_are_calendar_spans_in_utc() {
        let now = datetime!(2026-11-26 14:37:09.5 UTC);
        let cases = [
            (
                QuotaPeriod::Hourly,
                datetime!(2026-11-26 14:00 UTC),
                datetime!(2026-11-26 15:00 UTC),
            ),
            (
                QuotaPeriod::Daily,
                datetime!(2026-11-26 0:00 UTC),
                datetime!(2026-11-27 0:00 UTC),
            ),
            // 2026-11-26 is a Thursday: the week began on Monday the 23rd.
            (
                QuotaPeriod::Weekly,
                datetime!(2026-11-23 0:00 UTC),
                datetime!(2026-11-30 0:00 UTC),
            ),
            (
                QuotaPeriod::Monthly,
                datetime!(2026-11-01 0:00 UTC),
                datetime!(2026-12-01 0:00 UTC),
            ),
        ];
        for (period, start, end) in cases {
            assert_eq!(period.span(now), (start, end), "{period:?}");
        }
    }

    #[test]
    fn edges_belong_to_the_period_they_start_and_december_rolls_over() {
        let (start, end) = QuotaPeriod::Monthly.span(datetime!(2026-12-31 23:59:59 UTC));
        assert_eq!(start, datetime!(2026-12-01 0:00 UTC));
        assert_eq!(end, datetime!(2027-01-01 0:00 UTC));
        let (start, _) = QuotaPeriod::Daily.span(datetime!(2026-11-27 0:00 UTC));
        assert_eq!(start, datetime!(2026-11-27 0:00 UTC));
        // Another offset names the same instant: the UTC period holding it.
        let (start, _) = QuotaPeriod::Daily.span(datetime!(2026-11-27 1:00 +02:00));
        assert_eq!(start, datetime!(2026-11-26 0:00 UTC));
    }
}
