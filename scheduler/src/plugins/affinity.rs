//! NodeName, NodeAffinity (nodeSelector and required terms as a filter, preferred terms as
//! a score).

use super::Ctx;
use crate::model::{Op, PodInfo, Term};

#[inline]
pub fn name_matches(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    p.node_name.as_ref().is_none_or(|n| *n == c.t.names[i])
}

#[inline]
pub(crate) fn term_matches(term: &Term, c: &Ctx, i: usize) -> bool {
    if term.labels.is_empty() && term.names.is_none() {
        return false; // an empty term matches nothing
    }
    if let Some((positive, names)) = &term.names {
        let listed = names.iter().any(|n| *n == c.t.names[i]);
        if listed != *positive {
            return false;
        }
    }
    term.labels.iter().all(|r| {
        let v = c.t.label(i, r.key);
        match r.op {
            Op::In => v.is_some_and(|v| r.values.contains(&v)),
            Op::NotIn => v.is_none_or(|v| !r.values.contains(&v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
            Op::Gt | Op::Lt => {
                let Some(n) = v.and_then(|v| c.names.name(v).parse::<i64>().ok()) else { return false };
                if r.op == Op::Gt {
                    n > r.number
                } else {
                    n < r.number
                }
            }
        }
    })
}

/// nodeSelector (every pair) and required node affinity (any term).
#[inline]
pub fn required_matches(p: &PodInfo, c: &Ctx, i: usize) -> bool {
    if !p.node_selector.iter().all(|&(k, v)| c.t.label(i, k) == Some(v)) {
        return false;
    }
    p.required.as_ref().is_none_or(|terms| terms.iter().any(|term| term_matches(term, c, i)))
}

/// Sum of the weights of the preferred terms the node matches.
#[inline]
pub fn preferred_score(p: &PodInfo, c: &Ctx, i: usize) -> i64 {
    p.preferred.iter().filter(|(_, term)| term_matches(term, c, i)).map(|(w, _)| *w as i64).sum()
}
