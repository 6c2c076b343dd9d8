"""The router service: complexity classification, routing policy, and (later) the front-door orchestration."""
