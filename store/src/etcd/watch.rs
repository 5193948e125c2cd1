//! etcd Watch service: one task per client stream turns create/cancel/progress requests
//! into hub operations; the hub writes responses into the stream's queue.

use std::collections::HashSet;
use std::pin::Pin;

use futures::Stream;
use shoal_proto::etcdserverpb::{watch_create_request::FilterType, watch_request::RequestUnion, WatchRequest};
use shoal_proto::raw_watch::watch_server::Watch;
use shoal_proto::shoalstore::WatchResponseRaw;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::EtcdService;
use crate::mvcc::KeyRange;
use crate::watch::{WatchBatch, WatchItem, WatchSpec};

/// Batches queued per stream before its watchers fall back to catching up from history.
const STREAM_QUEUE: usize = 256;

type WatchStream = Pin<Box<dyn Stream<Item = WatchItem> + Send>>;

#[tonic::async_trait]
impl Watch for EtcdService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<WatchStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchBatch>(STREAM_QUEUE);
        let m = self.m.clone();
        let stream = m.hub.open_stream(tx.clone());
        tokio::spawn(async move {
            let mut ids: HashSet<i64> = HashSet::new();
            let mut next_id: i64 = 0;
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                match msg.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let id = if c.watch_id != 0 {
                            c.watch_id
                        } else {
                            while ids.contains(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        let rev = m.state.read().mvcc.rev();
                        if ids.contains(&id) || id < 0 {
                            let resp = WatchResponseRaw {
                                header: m.header_at(rev),
                                watch_id: id,
                                created: true,
                                canceled: true,
                                cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream".into(),
                                ..Default::default()
                            };
                            if tx.send(vec![Ok(resp)]).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        ids.insert(id);
                        let created = WatchResponseRaw { header: m.header_at(rev), watch_id: id, created: true, ..Default::default() };
                        if tx.send(vec![Ok(created)]).await.is_err() {
                            break;
                        }
                        let spec = WatchSpec {
                            range: KeyRange::from_etcd(&c.key, &c.range_end),
                            start_rev: c.start_revision,
                            prev_kv: c.prev_kv,
                            no_put: c.filters.contains(&(FilterType::Noput as i32)),
                            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
                            fragment: c.fragment,
                            progress_notify: c.progress_notify,
                        };
                        m.hub.add(&m.state, stream, id, spec);
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        if m.hub.cancel(stream, c.watch_id) {
                            ids.remove(&c.watch_id);
                            let resp = WatchResponseRaw { header: m.header(), watch_id: c.watch_id, canceled: true, ..Default::default() };
                            if tx.send(vec![Ok(resp)]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Some(RequestUnion::ProgressRequest(_)) => m.hub.request_progress(&m.state, stream),
                    None => {}
                }
            }
            m.hub.close_stream(stream);
        });
        let flat = futures::StreamExt::flat_map(tokio_stream::wrappers::ReceiverStream::new(rx), futures::stream::iter);
        Ok(Response::new(Box::pin(flat)))
    }
}
