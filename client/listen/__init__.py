"""``fedser-client listen``: keywords and the emotion of utterances in an audio stream, on the device.

``listener`` holds the streaming logic (``Listener``, its settings and events), ``kws`` the
recurrent keyword runner of ``crnn`` bundles, ``sources`` the audio inputs (file, stdin,
microphone) and ``cli`` the command line.
"""
