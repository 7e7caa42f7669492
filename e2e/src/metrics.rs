//! Prometheus text exposition, as served by the relay and the connector.

use std::collections::BTreeMap;

/// Parsed metrics: every sample, keyed by its series (`name` or `name{labels}`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: BTreeMap<String, f64>,
    raw: String,
}

impl Metrics {
    /// Parses the text format; comment lines and lines that don't parse are skipped.
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // `series value [timestamp]`; the series may hold spaces inside its label values.
            let (series, rest) = match line.rfind('}') {
                Some(close) => (&line[..=close], line[close + 1..].trim()),
                None => match line.split_once(char::is_whitespace) {
                    Some((s, r)) => (s, r.trim()),
                    None => continue,
                },
            };
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            samples.insert(series.to_owned(), value);
        }
        Self {
            samples,
            raw: text.to_owned(),
        }
    }

    /// The sum over all series of metric `name` (any labels), or `None` if it has none.
    pub fn get(&self, name: &str) -> Option<f64> {
        let mut found = None;
        for (series, v) in &self.samples {
            let base = series.split('{').next().unwrap_or(series);
            if base == name {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// [`Metrics::get`], with 0 for a metric that is absent (counters that never fired may be
    /// left out).
    pub fn value(&self, name: &str) -> f64 {
        self.get(name).unwrap_or(0.0)
    }

    /// The text as served.
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_labelled_series() {
        let m = Metrics::parse(
            "# HELP a_total things\n# TYPE a_total counter\na_total 3\n\
             b{kind=\"x y\"} 1.5\nb{kind=\"z\"} 2 1700000000\nc +Inf\nbad line here\n",
        );
        assert_eq!(m.get("a_total"), Some(3.0));
        assert_eq!(m.get("b"), Some(3.5));
        assert_eq!(m.get("c"), Some(f64::INFINITY));
        assert_eq!(m.get("missing"), None);
        assert_eq!(m.value("missing"), 0.0);
    }
}
