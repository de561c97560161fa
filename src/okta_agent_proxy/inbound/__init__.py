"""Who is calling: the verified Okta token and the agent it identifies (pipeline steps 2–3)."""
