//! Security at the edges of the service: mTLS on the gRPC port with certificate reload
//! (`tls`), who is calling (`caller`), the caller allow-lists (`authorization`) and
//! encryption of sensitive property values before they reach PostgreSQL (`pii`).

pub mod authorization;
pub mod caller;
pub mod pii;
pub mod tls;
