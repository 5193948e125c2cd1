//! Every active namespace has a `default` ServiceAccount (upstream's serviceaccounts
//! controller): created when missing, re-created when deleted.

use serde_json::{json, Value};
use shoal_client::Client;

use crate::informer::Informer;
use crate::queue::WorkQueue;
use crate::Leadership;

pub fn start(client: Client, namespaces: Informer, accounts: Informer, lead: Leadership) {
    let q = WorkQueue::default();
    crate::feed(&namespaces, &q, |k, _, _| vec![k.to_string()]);
    // A deleted default account brings its namespace back to the queue.
    crate::feed(&accounts, &q, |k, _, _| match k.split_once('/') {
        Some((ns, "default")) => vec![ns.to_string()],
        _ => vec![],
    });
    crate::spawn_workers("serviceaccount", q, lead, 1, move |ns| {
        let (client, namespaces, accounts) = (client.clone(), namespaces.clone(), accounts.clone());
        async move {
            let Some(n) = namespaces.get(&ns) else { return Ok(()) };
            if n.pointer("/metadata/deletionTimestamp").is_some() || n.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") {
                return Ok(());
            }
            if accounts.get(&format!("{ns}/default")).is_some() {
                return Ok(());
            }
            let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}});
            match client.create(&format!("/api/v1/namespaces/{ns}/serviceaccounts"), &sa).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_conflict() => Ok(()),
                // A namespace being deleted refuses new content: nothing to do.
                Err(e) if e.code() == 403 || e.is_not_found() => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    });
}
