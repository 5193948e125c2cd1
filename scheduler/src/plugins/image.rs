//! ImageLocality: prefer nodes that already hold the pod's images, weighted by image size
//! and by how widely the image is spread (an image on every node says nothing), scaled
//! between upstream's thresholds (23 MB and 1,000 MB per container).


use super::Ctx;
use crate::model::PodInfo;

const MIN_THRESHOLD: i64 = 23 * 1024 * 1024;
const MAX_CONTAINER_THRESHOLD: i64 = 1000 * 1024 * 1024;

#[inline]
pub fn score(p: &PodInfo, c: &Ctx, i: usize) -> i64 {
    if p.images.is_empty() || c.total_nodes == 0 || c.t.images[i].is_empty() {
        return 0;
    }
    let mut sum: i64 = 0;
    for img in &p.images {
        if let Some((_, size)) = c.t.images[i].iter().find(|(n, _)| n == img) {
            let spread = c.image_nodes.get(img).copied().unwrap_or(0) as f64 / c.total_nodes as f64;
            sum += (*size as f64 * spread) as i64;
        }
    }
    if sum == 0 {
        return 0;
    }
    let max = MAX_CONTAINER_THRESHOLD * p.images.len() as i64;
    let sum = sum.clamp(MIN_THRESHOLD, max);
    100 * (sum - MIN_THRESHOLD) / (max - MIN_THRESHOLD)
}
