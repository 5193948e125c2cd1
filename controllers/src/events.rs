//! Events the controllers record: the shared recorder of `shoal-client`.

pub use shoal_client::events::record;
