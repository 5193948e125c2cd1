//! Kubernetes resource quantities (`500m`, `1Gi`, `2.5`, `1e3`): parsed to milli-units,
//! as `resource.Quantity` does for comparison and arithmetic.

/// Parses a quantity to milli-units (saturating at i128 range); `None` when malformed.
pub fn parse(s: &str) -> Option<i128> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (neg, body) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let num_end = body.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(body.len());
    let (num, suffix) = body.split_at(num_end);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return None;
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    // value = mantissa * 10^-scale
    let digits = format!("{int_part}{frac_part}");
    let mantissa: i128 = if digits.is_empty() { 0 } else { digits.get(..digits.len().min(30))?.parse().ok()? };
    let mut exp10: i32 = -(frac_part.len() as i32) + (digits.len().saturating_sub(30)) as i32;
    let mut mul: i128 = 1;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => mul = 1 << 10,
        "Mi" => mul = 1 << 20,
        "Gi" => mul = 1 << 30,
        "Ti" => mul = 1 << 40,
        "Pi" => mul = 1 << 50,
        "Ei" => mul = 1 << 60,
        e if e.starts_with(['e', 'E']) => {
            let x: i32 = e[1..].parse().ok()?;
            exp10 += x;
        }
        _ => return None,
    }
    // milli-units: multiply by 10^3.
    exp10 += 3;
    let mut v = mantissa.saturating_mul(mul);
    if exp10 >= 0 {
        for _ in 0..exp10.min(40) {
            v = v.saturating_mul(10);
        }
    } else {
        let div = 10i128.checked_pow((-exp10).min(38) as u32).unwrap_or(i128::MAX);
        // Round up as upstream does for sub-milli precision.
        v = (v + div - 1) / div;
    }
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn quantities() {
        let table: &[(&str, Option<i128>)] = &[
            ("1", Some(1000)),
            ("500m", Some(500)),
            ("0.5", Some(500)),
            ("1Ki", Some(1024 * 1000)),
            ("1Gi", Some((1i128 << 30) * 1000)),
            ("2k", Some(2_000_000)),
            ("1e3", Some(1_000_000)),
            ("1.5Mi", Some(1_572_864_000)),
            ("100n", Some(1)),
            ("-1", Some(-1000)),
            ("", None),
            ("abc", None),
            ("1.2.3", None),
            ("1Xi", None),
        ];
        for (s, want) in table {
            assert_eq!(parse(s), *want, "{s}");
        }
    }
}
