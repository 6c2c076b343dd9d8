"""The budget service: atomic reservations with hard stops, settlement, and cost attribution."""
