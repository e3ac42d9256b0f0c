"""The local web app of ``p2pmega ui``: a second front end beside ``cli``, over the same ``api`` use cases.

``server`` holds the routes and ``serve``, ``guard`` the token and ``Host`` checks, ``jobs`` the running shares and
fetches; ``static/`` the page (plain HTML, JS and CSS, no build step, nothing loaded from elsewhere).
"""
