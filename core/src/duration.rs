//! SVID lifetimes, written as `10m`, `1h` or `90s`.

/// `10m`, `1h`, `90s`: seconds. SVID lifetimes from one minute to a day.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 10m, 1h or 90s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("'{s}' is not a duration like 10m, 1h or 90s")),
    };
    if !(60..=86_400).contains(&secs) {
        return Err(format!("'{s}' is out of range: SVIDs live from 1m to 24h"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5s").is_err());
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("m").is_err());
    }
}
