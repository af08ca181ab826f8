"""Who may open a stream and how much they may take: credentials, origins and limits."""
