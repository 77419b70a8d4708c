//! Weekly time windows: `"Mon-Fri 18:00-08:00"`, `"Sat-Sun"`, `"Mon,Wed 09:30-12:00"`,
//! `"22:00-06:00"`.
//!
//! A window starts on each of its days at its start time; one whose end is earlier than its
//! start runs past midnight into the next day, so `"Fri 18:00-08:00"` covers Friday evening
//! and Saturday morning, as BOINC's time-of-day preferences do.

/// A moment of the week in local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 is Monday, 6 is Sunday.
    weekday: u8,
    /// Minutes since midnight, 0–1439.
    minute: u16,
}

impl LocalTime {
    /// `weekday` 0 (Monday) to 6 (Sunday), `minute` since midnight; out-of-range values wrap.
    pub fn new(weekday: u8, minute: u16) -> Self {
        Self {
            weekday: weekday % 7,
            minute: minute % MINUTES_PER_DAY,
        }
    }

    pub fn weekday(&self) -> u8 {
        self.weekday
    }

    pub fn minute(&self) -> u16 {
        self.minute
    }
}

const MINUTES_PER_DAY: u16 = 24 * 60;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A weekly window work may run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: [bool; 7],
    /// Minutes since midnight; `start == end` is the whole day.
    start: u16,
    end: u16,
}

/// Why a window was refused, in words a volunteer reads next to the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("an empty window; write days and/or hours, e.g. \"Mon-Fri 18:00-08:00\"")]
    Empty,
    #[error("\"{0}\" is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, or a range such as Mon-Fri)")]
    Day(String),
    #[error("\"{0}\" is not a time range (HH:MM-HH:MM, e.g. 18:00-08:00)")]
    Hours(String),
    #[error("\"{0}\" has more than days and a time range")]
    Extra(String),
}

impl Window {
    pub fn parse(text: &str) -> Result<Self, WindowError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (days, hours) = match words.as_slice() {
            [] => return Err(WindowError::Empty),
            [one] if one.contains(':') => (None, Some(*one)),
            [one] => (Some(*one), None),
            [days, hours] => (Some(*days), Some(*hours)),
            _ => return Err(WindowError::Extra(text.trim().to_string())),
        };
        let days = match days {
            Some(days) => parse_days(days)?,
            None => [true; 7],
        };
        let (start, end) = match hours {
            Some(hours) => parse_hours(hours)?,
            None => (0, 0),
        };
        Ok(Self { days, start, end })
    }

    pub fn contains(&self, t: LocalTime) -> bool {
        let day = usize::from(t.weekday);
        let yesterday = (day + 6) % 7;
        if self.start == self.end {
            return self.days[day];
        }
        if self.start < self.end {
            return self.days[day] && (self.start..self.end).contains(&t.minute);
        }
        // Past midnight: this day's evening, or the morning after one of its days.
        (self.days[day] && t.minute >= self.start) || (self.days[yesterday] && t.minute < self.end)
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], WindowError> {
    let refused = || WindowError::Day(text.to_string());
    let day = |name: &str| {
        let name = name.to_ascii_lowercase();
        let short = name
            .get(..3)
            .filter(|_| is_day_name(&name))
            .ok_or_else(refused)?;
        DAYS.iter().position(|d| *d == short).ok_or_else(refused)
    };
    let mut days = [false; 7];
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                // Ranges wrap: Fri-Mon is Friday to Monday.
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// A day's short or full English name, any case.
fn is_day_name(name: &str) -> bool {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    name.len() == 3 || FULL.contains(&name)
}

fn parse_hours(text: &str) -> Result<(u16, u16), WindowError> {
    let refused = || WindowError::Hours(text.to_string());
    let (from, to) = text.split_once('-').ok_or_else(refused)?;
    let minute = |hhmm: &str, end: bool| -> Result<u16, WindowError> {
        let (h, m) = hhmm.split_once(':').ok_or_else(refused)?;
        if h.is_empty() || h.len() > 2 || m.len() != 2 {
            return Err(refused());
        }
        let h: u16 = h.parse().map_err(|_| refused())?;
        let m: u16 = m.parse().map_err(|_| refused())?;
        match (h, m) {
            (24, 0) if end => Ok(0),
            (0..=23, 0..=59) => Ok(h * 60 + m),
            _ => Err(refused()),
        }
    };
    Ok((minute(from, false)?, minute(to, true)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(day: u8, hh: u16, mm: u16) -> LocalTime {
        LocalTime::new(day, hh * 60 + mm)
    }

    #[test]
    fn windows_parse_and_cover_what_they_say() {
        let evenings = Window::parse("Mon-Fri 18:00-08:00").expect("parses");
        assert!(evenings.contains(at(0, 18, 0)));
        assert!(evenings.contains(at(1, 7, 59)));
        assert!(!evenings.contains(at(1, 8, 0)));
        assert!(!evenings.contains(at(0, 7, 0)), "Sunday night is not in it");
        assert!(
            evenings.contains(at(5, 7, 0)),
            "Friday night runs into Saturday"
        );

        let weekend = Window::parse("Sat-Sun").expect("parses");
        assert!(weekend.contains(at(5, 0, 0)) && weekend.contains(at(6, 23, 59)));
        assert!(!weekend.contains(at(4, 23, 59)));

        let nights = Window::parse("22:00-06:00").expect("parses");
        assert!(nights.contains(at(3, 23, 0)) && nights.contains(at(4, 5, 59)));
        assert!(!nights.contains(at(4, 6, 0)));

        let list = Window::parse("mon,Wednesday 09:30-24:00").expect("parses");
        assert!(list.contains(at(2, 23, 59)) && list.contains(at(0, 9, 30)));
        assert!(!list.contains(at(1, 12, 0)) && !list.contains(at(0, 9, 29)));

        let wrapping = Window::parse("Fri-Mon").expect("parses");
        assert!(wrapping.contains(at(6, 12, 0)) && wrapping.contains(at(0, 12, 0)));
        assert!(!wrapping.contains(at(2, 12, 0)));
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        assert_eq!(Window::parse("  "), Err(WindowError::Empty));
        assert!(matches!(Window::parse("Mo-Fr"), Err(WindowError::Day(_))));
        assert!(matches!(Window::parse("Mondays"), Err(WindowError::Day(_))));
        assert!(matches!(
            Window::parse("Mon 18-08"),
            Err(WindowError::Hours(_))
        ));
        assert!(matches!(
            Window::parse("Mon 25:00-08:00"),
            Err(WindowError::Hours(_))
        ));
        assert!(matches!(
            Window::parse("24:00-08:00"),
            Err(WindowError::Hours(_))
        ));
        assert!(matches!(
            Window::parse("Mon 18:00-08:00 extra"),
            Err(WindowError::Extra(_))
        ));
        assert!(matches!(
            Window::parse("Mon 9:5-10:00"),
            Err(WindowError::Hours(_))
        ));
        assert!(matches!(Window::parse("Moé-Fri"), Err(WindowError::Day(_))));
        assert!(matches!(
            Window::parse("Mon 1é:00-2"),
            Err(WindowError::Hours(_))
        ));
    }
}
