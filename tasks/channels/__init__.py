"""Message channels (Discord, SMS, email): splitting a text to each one's rules, and delivery."""
